//! `bootmesh-sim`: rehearses a boot storm (the storm engine: the real swarm cores on a fluid
//! network) or failures of the cluster (the chaos engine: the real servers on turmoil) from a
//! scenario file, in virtual time. `bootmesh sim ...` runs it: the simulator links the whole server and would
//! make `node` depend on itself, so it is its own executable beside `bootmesh`, as `git foo`
//! runs `git-foo`.
//!
//! ```text
//! bootmesh sim --scenario sim/scenarios/rack-power-on.toml [--seed N] [--serving swarm|central]
//!              [--baseline] [--svg FILE] [--reproduce]
//! bootmesh sim soak --scenario FILE --seeds 1..=20 [--log sim/soak.log]
//! bootmesh sim soak-summary [--log sim/soak.log]
//! ```
#![allow(
    clippy::disallowed_methods,
    reason = "the command's edge: it times runs and dates soak log lines on the wall clock"
)]
#![allow(clippy::print_stdout, reason = "the report is the command's output")]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use sim::chaos::{ChaosScenario, is_chaos_scenario, run_chaos};
use sim::storm::{Serving, StormEngine, StormReport, StormScenario, run_storm, storm_svg};

/// The commit this simulator was built from (see build.rs).
const COMMIT: &str = env!("BOOTMESH_SIM_COMMIT");

/// Rehearse failures in virtual time. A storm scenario runs the real fetch scheduler, tracker,
/// upload gate and send claims of every node on a fluid model of NICs, rack uplinks and the
/// spine. A chaos scenario (`engine = "chaos"`) runs the real servers (Raft, store, lease
/// store, DHCP) with thousands of booting nodes under crashes, partitions and loss, and checks
/// that no address is ever held twice. One seed gives one run; a failing seed prints the
/// command that replays it.
#[derive(Debug, Parser)]
#[command(
    name = "bootmesh sim",
    bin_name = "bootmesh sim",
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  bootmesh sim --scenario sim/scenarios/rack-power-on.toml --baseline --svg storm.svg\n  bootmesh sim --scenario sim/scenarios/leader-crash-loop.toml --seed 7 --reproduce\n  bootmesh sim soak --scenario sim/scenarios/rack-power-loss.toml --seeds 1..=50\n  bootmesh sim soak-summary"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<SimCommand>,
    #[command(flatten)]
    run: RunArguments,
}

#[derive(Debug, Args)]
struct RunArguments {
    /// The scenario (TOML; the shipped ones are in sim/scenarios/).
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// The seed every choice of the run follows from.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Serve as the scenario says, or override it.
    #[arg(long, value_enum)]
    serving: Option<ServingArgument>,
    /// Also run the central (LTSP-style) baseline and report both.
    #[arg(long)]
    baseline: bool,
    /// Write an SVG: the boot-time CDF and the image bytes by source of each run (for a chaos
    /// scenario: by server).
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Run the seed twice and fail unless both runs have the same trace hash.
    #[arg(long)]
    reproduce: bool,
    /// Print where the run is (virtual time, nodes still without the image) on standard
    /// error every this many million events: for fleets that take minutes.
    #[arg(long, value_name = "MILLION_EVENTS")]
    progress: Option<u64>,
    /// Chaos scenarios: run the servers with a deliberate bug, to see the checkers catch it.
    #[arg(long, value_enum)]
    sabotage: Option<SabotageArgument>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SabotageArgument {
    /// The lease store reports a batch committed before Raft commits it.
    AckBeforeCommit,
    /// The majority reassigns a cut-off server's block as soon as its lease ran out, without
    /// waiting out the leases the cut-off server may still have granted from it.
    EarlyBlockReuse,
    /// The servers count a lease as ended an hour before it ends, and give its address to
    /// another node once their blocks run short.
    UnexpiredAddressReuse,
    /// The nodes keep image chunks without checking them against the manifest.
    SkipChunkVerification,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ServingArgument {
    /// Tracker, peers and racks (bootmesh).
    Swarm,
    /// Every node reads the whole image from one server (LTSP-style).
    Central,
}

#[derive(Debug, Subcommand)]
enum SimCommand {
    /// Run a range of seeds and append the range, the commit and the result to a log.
    Soak {
        /// The scenario.
        #[arg(long)]
        scenario: PathBuf,
        /// Seeds to run, as FIRST..=LAST (or FIRST..END, END excluded, or one seed).
        #[arg(long, value_parser = parse_seed_range)]
        seeds: RangeInclusive<u64>,
        /// The log the result is appended to (tab-separated, one line per soak).
        #[arg(long, default_value = "sim/soak.log")]
        log: PathBuf,
    },
    /// How many seeds each scenario has survived, by the log.
    SoakSummary {
        /// The log to read.
        #[arg(long, default_value = "sim/soak.log")]
        log: PathBuf,
    },
}

fn parse_seed_range(text: &str) -> Result<RangeInclusive<u64>, String> {
    let parse = |part: &str| {
        part.trim()
            .parse::<u64>()
            .map_err(|error| format!("{part:?}: {error}"))
    };
    let (first, last) = if let Some((first, last)) = text.split_once("..=") {
        (parse(first)?, parse(last)?)
    } else if let Some((first, end)) = text.split_once("..") {
        let end = parse(end)?;
        if end == 0 {
            return Err("an empty range".to_owned());
        }
        (parse(first)?, end - 1)
    } else {
        let seed = parse(text)?;
        (seed, seed)
    };
    if first > last {
        return Err(format!("an empty range: {first} > {last}"));
    }
    if last - first >= 1_000_000 {
        return Err("at most a million seeds per soak".to_owned());
    }
    Ok(first..=last)
}

fn read_scenario(path: &Path) -> anyhow::Result<StormScenario> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    StormScenario::from_toml(&text).with_context(|| format!("{}", path.display()))
}

fn replay_command(scenario: &Path, seed: u64) -> String {
    format!(
        "bootmesh sim --scenario {} --seed {seed} --reproduce",
        scenario.display()
    )
}

fn serving_label(serving: Serving) -> &'static str {
    match serving {
        Serving::Swarm => "swarm",
        Serving::Central => "central",
    }
}

fn read_chaos_scenario(path: &Path, text: &str) -> anyhow::Result<ChaosScenario> {
    ChaosScenario::from_toml(text).with_context(|| format!("{}", path.display()))
}

fn run_chaos_scenario(path: &Path, text: &str, arguments: &RunArguments) -> anyhow::Result<()> {
    let scenario = read_chaos_scenario(path, text)?;
    let mut spec = scenario.spec(arguments.seed);
    match arguments.sabotage {
        Some(SabotageArgument::AckBeforeCommit) => spec.sabotage.ack_before_commit = true,
        Some(SabotageArgument::EarlyBlockReuse) => spec.sabotage.early_block_reuse = true,
        Some(SabotageArgument::UnexpiredAddressReuse) => {
            spec.sabotage.unexpired_address_reuse = true;
        }
        Some(SabotageArgument::SkipChunkVerification) => spec.skip_chunk_verification = true,
        None => {}
    }
    let mut hashes = Vec::new();
    {
        let started = Instant::now();
        let report = run_chaos(&spec).with_context(|| {
            format!(
                "{} seed {}; replay with: {}",
                scenario.name,
                arguments.seed,
                replay_command(path, arguments.seed)
            )
        })?;
        println!(
            "{}: {} servers, {} nodes on {} farms, seed {}",
            scenario.name, scenario.servers, scenario.nodes, scenario.farms, arguments.seed
        );
        print!("{}", report.text());
        println!(
            "{:.2} s of wall time; replay with: {}",
            started.elapsed().as_secs_f64(),
            replay_command(path, arguments.seed)
        );
        if let Some(svg_path) = &arguments.svg {
            let title = format!(
                "{}, seed {}: {} servers, {} nodes, {} faults",
                scenario.name,
                arguments.seed,
                scenario.servers,
                scenario.nodes,
                report.faults.len()
            );
            std::fs::write(svg_path, report.svg(&title))
                .with_context(|| format!("writing {}", svg_path.display()))?;
            println!("plot written to {}", svg_path.display());
        }
        hashes.push(report.trace_hash);
    }
    if arguments.reproduce {
        // The replay runs in a process of its own, as a user's replay would: a second chaos
        // run in one process can differ from the first (ADR 0012, "an open question").
        let mut replay = std::process::Command::new(std::env::current_exe()?);
        replay
            .arg("--scenario")
            .arg(path)
            .arg("--seed")
            .arg(arguments.seed.to_string());
        if let Some(sabotage) = arguments.sabotage {
            let name = sabotage
                .to_possible_value()
                .map(|value| value.get_name().to_owned())
                .unwrap_or_default();
            replay.arg("--sabotage").arg(name);
        }
        let output = replay.output().context("running the replay")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        print!("{stdout}");
        let replayed = stdout
            .split("trace hash ")
            .nth(1)
            .and_then(|rest| rest.get(..16))
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .with_context(|| {
                format!(
                    "the replay printed no trace hash: {}",
                    String::from_utf8_lossy(&output.stderr)
                )
            })?;
        hashes.push(replayed);
    }
    if hashes.windows(2).any(|pair| pair[0] != pair[1]) {
        bail!("the same seed gave two different traces: {hashes:x?}");
    }
    if arguments.reproduce {
        println!(
            "reproduced: both runs have trace hash {:016x} (the replay in a process of its own)",
            hashes[0]
        );
    }
    Ok(())
}

fn run(arguments: &RunArguments) -> anyhow::Result<()> {
    let Some(path) = &arguments.scenario else {
        bail!("--scenario FILE is required (see --help)");
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if is_chaos_scenario(&text) {
        return run_chaos_scenario(path, &text, arguments);
    }
    if arguments.sabotage.is_some() {
        bail!("--sabotage is for chaos scenarios (engine = \"chaos\")");
    }
    let mut scenario =
        StormScenario::from_toml(&text).with_context(|| format!("{}", path.display()))?;
    if let Some(serving) = arguments.serving {
        scenario.serving = match serving {
            ServingArgument::Swarm => Serving::Swarm,
            ServingArgument::Central => Serving::Central,
        };
    }
    let mut variants = vec![scenario.clone()];
    if arguments.baseline && scenario.serving != Serving::Central {
        let mut central = scenario.clone();
        central.serving = Serving::Central;
        variants.push(central);
    }
    let runs = if arguments.reproduce { 2 } else { 1 };
    let mut reports: Vec<(&str, StormReport)> = Vec::new();
    for variant in &variants {
        let label = serving_label(variant.serving);
        let mut hashes = Vec::new();
        let mut last = None;
        for _ in 0..runs {
            let started = Instant::now();
            let every_events = arguments
                .progress
                .map_or(u64::MAX, |million| million.max(1).saturating_mul(1_000_000));
            let engine = StormEngine::new(variant.clone(), arguments.seed)
                .with_context(|| format!("{}", path.display()))?;
            let report = engine
                .run_observed(every_events, |progress| {
                    eprintln!(
                        "{label}: virtual {:.2} s, {} events, {} of {} nodes without the image, {:.0} s of wall time",
                        progress.virtual_seconds,
                        progress.events,
                        progress.nodes_without_the_image,
                        progress.nodes,
                        started.elapsed().as_secs_f64()
                    );
                })
                .with_context(|| {
                format!(
                    "seed {} ({label}); replay with: {}",
                    arguments.seed,
                    replay_command(path, arguments.seed)
                )
            })?;
            print!("{}", report.text());
            println!(
                "seed {}: {:.2} s of wall time; replay with: {}",
                arguments.seed,
                started.elapsed().as_secs_f64(),
                replay_command(path, arguments.seed)
            );
            hashes.push(report.trace_hash());
            last = Some(report);
        }
        if hashes.windows(2).any(|pair| pair[0] != pair[1]) {
            bail!("the same seed gave two different traces ({label}): {hashes:x?}");
        }
        if arguments.reproduce {
            println!("reproduced: both runs have trace hash {:016x}", hashes[0]);
        }
        if let Some(report) = last {
            reports.push((label, report));
        }
    }
    if let Some(svg_path) = &arguments.svg {
        let runs: Vec<(&str, &StormReport)> = reports
            .iter()
            .map(|(label, report)| (*label, report))
            .collect();
        let title = format!("{} (seed {})", scenario.name, arguments.seed);
        std::fs::write(svg_path, storm_svg(&title, &runs))
            .with_context(|| format!("writing {}", svg_path.display()))?;
        println!("plot written to {}", svg_path.display());
    }
    Ok(())
}

fn soak(scenario_path: &Path, seeds: &RangeInclusive<u64>, log: &Path) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(scenario_path)
        .with_context(|| format!("reading {}", scenario_path.display()))?;
    let started = Instant::now();
    let mut failed = Vec::new();
    let (engine, name, summary) = if is_chaos_scenario(&text) {
        let scenario = read_chaos_scenario(scenario_path, &text)?;
        let mut grants = 0u64;
        for seed in seeds.clone() {
            match run_chaos(&scenario.spec(seed)) {
                Ok(report) => grants += report.minority_grants,
                Err(error) => {
                    eprintln!(
                        "seed {seed} failed: {error}\n  replay with: {}",
                        replay_command(scenario_path, seed)
                    );
                    failed.push(seed);
                }
            }
        }
        (
            "chaos",
            scenario.name,
            format!("{grants} leases granted while cut off"),
        )
    } else {
        let scenario = read_scenario(scenario_path)?;
        let mut slowest = 0.0f64;
        for seed in seeds.clone() {
            match run_storm(&scenario, seed) {
                Ok(report) => slowest = slowest.max(report.fetch_percentiles[2]),
                Err(error) => {
                    eprintln!(
                        "seed {seed} failed: {error}\n  replay with: {}",
                        replay_command(scenario_path, seed)
                    );
                    failed.push(seed);
                }
            }
        }
        (
            "storm",
            scenario.name,
            format!("slowest fetch {slowest:.2} s"),
        )
    };
    let count = seeds.end() - seeds.start() + 1;
    let result = if failed.is_empty() {
        "passed".to_owned()
    } else {
        let listed: Vec<String> = failed.iter().take(20).map(u64::to_string).collect();
        format!("failed {} (seeds {})", failed.len(), listed.join(","))
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let line = format!(
        "{}\t{COMMIT}\t{engine}\t{}\t{}..={}\t{count}\t{result}\t{:.1}\n",
        boot_services::timeline::utc_timestamp(now),
        name,
        seeds.start(),
        seeds.end(),
        started.elapsed().as_secs_f64()
    );
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    file.write_all(line.as_bytes())
        .with_context(|| format!("appending to {}", log.display()))?;
    println!(
        "{count} seeds of {name}: {result}; {summary}; logged to {}",
        log.display()
    );
    Ok(failed.is_empty())
}

/// Per (engine, scenario): seeds passed, seeds failed, soaks, the newest soak's commit.
type SoakTotals = BTreeMap<(String, String), (u64, u64, u64, String)>;

fn soak_totals(log: &Path, text: &str) -> anyhow::Result<SoakTotals> {
    let mut totals = SoakTotals::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let place = || format!("{}:{}", log.display(), number + 1);
        let fields: Vec<&str> = line.split('\t').collect();
        let [_, commit, engine, scenario, _, count, result, ..] = fields.as_slice() else {
            bail!("{}: not a soak line (too few fields)", place());
        };
        let count: u64 = count
            .parse()
            .with_context(|| format!("{}: seed count", place()))?;
        let failed: u64 = match result.strip_prefix("failed ") {
            None => 0,
            Some(rest) => rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .parse()
                .with_context(|| format!("{}: result", place()))?,
        };
        let entry = totals
            .entry(((*engine).to_owned(), (*scenario).to_owned()))
            .or_default();
        entry.0 += count.saturating_sub(failed);
        entry.1 += failed;
        entry.2 += 1;
        (*commit).clone_into(&mut entry.3);
    }
    Ok(totals)
}

fn soak_summary(log: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    println!("engine\tscenario\tseeds passed\tseeds failed\tsoaks\tnewest commit");
    for ((engine, scenario), (passed, failed, soaks, commit)) in soak_totals(log, &text)? {
        println!("{engine}\t{scenario}\t{passed}\t{failed}\t{soaks}\t{commit}");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match &cli.command {
        None => run(&cli.run).map(|()| true),
        Some(SimCommand::Soak {
            scenario,
            seeds,
            log,
        }) => soak(scenario, seeds, log),
        Some(SimCommand::SoakSummary { log }) => soak_summary(log).map(|()| true),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("bootmesh sim: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_ranges_read_both_ways_and_refuse_empty_ones() {
        assert_eq!(parse_seed_range("1..=20"), Ok(1..=20));
        assert_eq!(parse_seed_range("1..21"), Ok(1..=20));
        assert_eq!(parse_seed_range("7"), Ok(7..=7));
        assert!(parse_seed_range("5..=4").is_err());
        assert!(parse_seed_range("0..0").is_err());
        assert!(parse_seed_range("a..=4").is_err());
    }

    #[test]
    fn the_soak_summary_adds_seeds_up_by_scenario_and_refuses_a_bad_line() {
        let log = Path::new("soak.log");
        let text = "# comment\n\
            2026-12-01T00:00:00Z\tabc\tstorm\tfleet-1k\t1..=10\t10\tpassed\t3.0\n\
            2026-12-01T01:00:00Z\tdef\tstorm\tfleet-1k\t11..=20\t10\tfailed 2 (seeds 12,15)\t3.1\n\
            2026-12-01T02:00:00Z\tdef\tstorm\tlab\t1..=5\t5\tpassed\t1.0\n";
        let totals = soak_totals(log, text).expect("the log reads");
        assert_eq!(
            totals.get(&("storm".to_owned(), "fleet-1k".to_owned())),
            Some(&(18, 2, 2, "def".to_owned()))
        );
        assert_eq!(
            totals.get(&("storm".to_owned(), "lab".to_owned())),
            Some(&(5, 0, 1, "def".to_owned()))
        );
        let error = soak_totals(log, "a\tb\n").expect_err("a short line is refused");
        assert!(error.to_string().contains("soak.log:1"), "{error}");
    }
}
