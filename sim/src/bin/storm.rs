//! `storm`: runs a storm scenario with the real swarm cores in virtual time and prints the
//! report.
//!
//! ```text
//! storm --scenario sim/scenarios/rack-power-on.toml [--seed N] [--serving swarm|central] [--twice]
//! ```
//!
//! `--twice` runs the same seed again and fails unless both runs have the same trace hash.
#![allow(
    clippy::disallowed_methods,
    reason = "the command's edge: it times the run on the wall clock for the report"
)]
#![allow(clippy::print_stdout, reason = "the report is the command's output")]

use std::process::ExitCode;
use std::time::Instant;

use sim::storm::{Serving, StormScenario, run_storm};

struct Arguments {
    scenario: String,
    seed: u64,
    serving: Option<Serving>,
    twice: bool,
}

fn parse(mut arguments: impl Iterator<Item = String>) -> Result<Arguments, String> {
    let mut parsed = Arguments {
        scenario: String::new(),
        seed: 1,
        serving: None,
        twice: false,
    };
    while let Some(argument) = arguments.next() {
        let mut value = |name: &str| {
            arguments
                .next()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match argument.as_str() {
            "--scenario" => parsed.scenario = value("--scenario")?,
            "--seed" => {
                parsed.seed = value("--seed")?
                    .parse()
                    .map_err(|error| format!("--seed: {error}"))?;
            }
            "--serving" => {
                parsed.serving = Some(match value("--serving")?.as_str() {
                    "swarm" => Serving::Swarm,
                    "central" => Serving::Central,
                    other => return Err(format!("--serving: swarm or central, not {other}")),
                });
            }
            "--twice" => parsed.twice = true,
            "--help" | "-h" => {
                return Err(
                    "usage: storm --scenario FILE [--seed N] [--serving swarm|central] [--twice]"
                        .to_owned(),
                );
            }
            other => return Err(format!("unknown argument {other}; see --help")),
        }
    }
    if parsed.scenario.is_empty() {
        return Err("--scenario FILE is required; see --help".to_owned());
    }
    Ok(parsed)
}

fn main() -> ExitCode {
    let arguments = match parse(std::env::args().skip(1)) {
        Ok(arguments) => arguments,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let text = match std::fs::read_to_string(&arguments.scenario) {
        Ok(text) => text,
        Err(error) => {
            eprintln!("reading {}: {error}", arguments.scenario);
            return ExitCode::from(2);
        }
    };
    let mut scenario = match StormScenario::from_toml(&text) {
        Ok(scenario) => scenario,
        Err(error) => {
            eprintln!("{}: {error}", arguments.scenario);
            return ExitCode::from(2);
        }
    };
    if let Some(serving) = arguments.serving {
        scenario.serving = serving;
    }
    let runs = if arguments.twice { 2 } else { 1 };
    let mut hashes = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        match run_storm(&scenario, arguments.seed) {
            Ok(report) => {
                print!("{}", report.text());
                println!(
                    "seed {}: {:.2} s of wall time; replay with: storm --scenario {} --seed {}",
                    arguments.seed,
                    started.elapsed().as_secs_f64(),
                    arguments.scenario,
                    arguments.seed
                );
                hashes.push(report.trace_hash());
            }
            Err(error) => {
                eprintln!(
                    "seed {}: {error}; replay with: storm --scenario {} --seed {}",
                    arguments.seed, arguments.scenario, arguments.seed
                );
                return ExitCode::FAILURE;
            }
        }
    }
    if hashes.windows(2).any(|pair| pair[0] != pair[1]) {
        eprintln!("the same seed gave two different traces: {hashes:x?}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
