//! `bootmesh sim`: the simulator is its own executable (`bootmesh-sim`, built by the workspace
//! beside `bootmesh`), and `bootmesh sim ...` runs it with the arguments as they are.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../sim/scenarios")
        .join(format!("{name}.toml"))
}

fn bootmesh_sim(arguments: &[&std::ffi::OsStr]) -> Output {
    let binary = Path::new(env!("CARGO_BIN_EXE_bootmesh"));
    let simulator = binary.with_file_name("bootmesh-sim");
    assert!(
        simulator.is_file(),
        "{} is missing: build the workspace (cargo build --release --workspace)",
        simulator.display()
    );
    Command::new(binary)
        .arg("sim")
        .args(arguments)
        .output()
        .expect("run bootmesh sim")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn bootmesh_sim_replays_a_seed_plots_it_and_logs_a_soak() {
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let svg = scratch.path().join("storm.svg");
    let lab = scenario("lab-twenty-agents");
    let output = bootmesh_sim(&[
        "--scenario".as_ref(),
        lab.as_os_str(),
        "--seed".as_ref(),
        "2".as_ref(),
        "--reproduce".as_ref(),
        "--baseline".as_ref(),
        "--svg".as_ref(),
        svg.as_os_str(),
    ]);
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        text(&output.stderr)
    );
    assert_eq!(
        stdout
            .matches("reproduced: both runs have trace hash")
            .count(),
        2,
        "{stdout}"
    );
    assert!(
        stdout.contains("central (every node from one server"),
        "{stdout}"
    );
    let picture = std::fs::read_to_string(&svg).expect("the plot is written");
    assert!(picture.starts_with("<svg") && picture.trim_end().ends_with("</svg>"));
    assert!(picture.contains("swarm: p50") && picture.contains("central: p50"));

    let log = scratch.path().join("soak.log");
    let output = bootmesh_sim(&[
        "soak".as_ref(),
        "--scenario".as_ref(),
        lab.as_os_str(),
        "--seeds".as_ref(),
        "1..=3".as_ref(),
        "--log".as_ref(),
        log.as_os_str(),
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let logged = std::fs::read_to_string(&log).expect("the soak log");
    let fields: Vec<&str> = logged.trim_end().split('\t').collect();
    assert_eq!(fields.len(), 8, "{logged}");
    assert_eq!(
        &fields[2..7],
        ["storm", "lab-twenty-agents", "1..=3", "3", "passed"]
    );
    let output = bootmesh_sim(&["soak-summary".as_ref(), "--log".as_ref(), log.as_os_str()]);
    let summary = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        summary.contains("storm\tlab-twenty-agents\t3\t0\t1\t"),
        "{summary}"
    );
}

#[test]
fn bootmesh_sim_refuses_a_bad_scenario_naming_the_file_and_the_key() {
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let bad = scratch.path().join("bad.toml");
    let text_of_lab =
        std::fs::read_to_string(scenario("lab-twenty-agents")).expect("the lab scenario");
    std::fs::write(&bad, text_of_lab.replace("[fleet]", "[fleet]\nrackz = 3")).expect("write");
    let output = bootmesh_sim(&["--scenario".as_ref(), bad.as_os_str()]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("bad.toml") && stderr.contains("rackz"),
        "{stderr}"
    );
}

#[test]
fn bootmesh_sim_runs_a_chaos_scenario_replays_it_and_a_sabotaged_server_fails_with_the_replay_command()
 {
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let scenario = scratch.path().join("small-crash-loop.toml");
    std::fs::write(
        &scenario,
        "engine = \"chaos\"\nname = \"small-crash-loop\"\nfarms = 2\nnodes = 60\nstart_window_secs = 5\nlease_secs = 30\nsafety_secs = 40\nliveness_secs = 30\n\n[[fault]]\nkind = \"leader_crash_loop\"\nfrom_secs = 5\nevery_secs = 10\ndown_secs = 4\nuntil_secs = 35\n",
    )
    .expect("write the scenario");
    let picture = scratch.path().join("chaos.svg");
    let output = bootmesh_sim(&[
        "--scenario".as_ref(),
        scenario.as_os_str(),
        "--seed".as_ref(),
        "4".as_ref(),
        "--reproduce".as_ref(),
        "--svg".as_ref(),
        picture.as_os_str(),
    ]);
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        text(&output.stderr)
    );
    assert!(stdout.contains("crashed server"), "{stdout}");
    assert!(stdout.contains("invariants held"), "{stdout}");
    assert!(
        stdout.contains("reproduced: both runs have trace hash"),
        "{stdout}"
    );
    assert!(
        stdout.contains("boot (power-on to image held): p50"),
        "{stdout}"
    );
    let svg = std::fs::read_to_string(&picture).expect("the chaos plot is written");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for server in ["from server1", "from server2", "from server3"] {
        assert!(svg.contains(server), "{server} in {svg}");
    }

    let sabotaged = bootmesh_sim(&[
        "--scenario".as_ref(),
        scenario.as_os_str(),
        "--sabotage".as_ref(),
        "ack-before-commit".as_ref(),
    ]);
    let stderr = text(&sabotaged.stderr);
    assert!(!sabotaged.status.success(), "{stderr}");
    assert!(stderr.contains("no server had committed"), "{stderr}");
    assert!(
        stderr.contains("replay with: bootmesh sim --scenario"),
        "{stderr}"
    );
}
