//! Boot servers form a Raft cluster over QUIC with mutual TLS: separate `bootmesh serve`
//! processes, each in its own network namespace on one bridge, data directories on disk.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::lab::{self, Lab, run_checked, wait_for};

const PORT: u16 = 7100;

struct ClusterLab {
    lab: Lab,
    namespaces: Vec<String>,
}

impl ClusterLab {
    /// `servers` namespaces `s1..`, addresses 10.70.0.<i>/24 on one bridge.
    fn new(servers: usize) -> Self {
        let mut lab = Lab::new();
        let switch = lab.namespace("sw");
        run_checked(
            "ip",
            &["-n", &switch, "link", "add", "br0", "type", "bridge"],
        );
        run_checked("ip", &["-n", &switch, "link", "set", "br0", "up"]);
        let mut namespaces = Vec::new();
        for index in 1..=servers {
            let namespace = lab.namespace(&format!("s{index}"));
            let (inside, outside) = lab.veth(&format!("c{index}"), &namespace, &switch);
            lab.add_address(&namespace, &inside, &format!("10.70.0.{index}/24"));
            run_checked(
                "ip",
                &["-n", &switch, "link", "set", &outside, "master", "br0"],
            );
            namespaces.push(namespace);
        }
        Self { lab, namespaces }
    }

    fn state_dir(&self, index: usize) -> PathBuf {
        self.lab.path(&format!("state{index}"))
    }

    fn address(index: usize) -> String {
        format!("10.70.0.{index}:{PORT}")
    }

    /// Runs `bootmesh <args> --state-dir <state of server index>` in server `index`'s
    /// namespace; returns (success, stdout, stderr).
    fn bootmesh(&self, index: usize, args: &[&str]) -> (bool, String, String) {
        self.bootmesh_as(index, &self.state_dir(index), args)
    }

    fn bootmesh_as(
        &self,
        index: usize,
        state_dir: &std::path::Path,
        args: &[&str],
    ) -> (bool, String, String) {
        let state_dir = state_dir.to_string_lossy().into_owned();
        let mut arguments: Vec<&str> = args.to_vec();
        arguments.extend(["--state-dir", state_dir.as_str()]);
        let output = self.lab.run(
            &self.namespaces[index - 1],
            Duration::from_secs(60),
            env!("CARGO_BIN_EXE_bootmesh"),
            &arguments,
        );
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    fn serve(&mut self, index: usize) {
        let config = format!(
            "state_dir = \"{}\"\n\n[cluster]\n",
            self.state_dir(index).display()
        );
        let namespace = self.namespaces[index - 1].clone();
        self.lab.serve(&format!("s{index}"), &namespace, &config);
    }

    fn token(&self, asked: usize, ttl_secs: u64) -> String {
        let ttl = ttl_secs.to_string();
        let (ok, stdout, stderr) =
            self.bootmesh(asked, &["token", "create", "--ttl-secs", ttl.as_str()]);
        assert!(ok, "token create: {stderr}");
        stdout.trim().to_owned()
    }

    fn join(&self, index: usize, token: &str, via: usize) -> (bool, String, String) {
        let server = Self::address(via);
        let address = Self::address(index);
        self.bootmesh(
            index,
            &[
                "cluster",
                "join",
                "--token",
                token,
                "--server",
                server.as_str(),
                "--address",
                address.as_str(),
                "--rack",
                &format!("rack{}", index % 2),
            ],
        )
    }

    /// Server `index`'s view of the cluster, when it answers.
    fn status(&self, index: usize) -> Option<serde_json::Value> {
        let (ok, stdout, _) = self.bootmesh(index, &["cluster", "status", "--json"]);
        if !ok {
            return None;
        }
        serde_json::from_str(&stdout).ok()
    }

    fn log(&self, index: usize) -> String {
        self.lab.log(&format!("s{index}"))
    }

    fn logs(&self) -> String {
        (1..=self.namespaces.len())
            .map(|index| format!("--- s{index}\n{}", self.log(index)))
            .collect()
    }
}

fn voters(status: &serde_json::Value) -> usize {
    status["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .filter(|member| member["voter"] == serde_json::Value::Bool(true))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn three_servers_join_by_token_elect_and_a_new_leader_takes_over_after_kill_9() {
    if !lab::enabled() {
        return;
    }
    let mut cluster = ClusterLab::new(3);
    let founder = ClusterLab::address(1);
    let (ok, stdout, stderr) = cluster.bootmesh(
        1,
        &[
            "cluster",
            "init",
            "--address",
            founder.as_str(),
            "--rack",
            "rack1",
        ],
    );
    assert!(ok, "cluster init: {stderr}");
    assert!(stdout.contains("CA fingerprint"), "{stdout}");
    cluster.serve(1);
    wait_for(Duration::from_secs(30), || {
        cluster
            .status(1)
            .is_some_and(|status| status["leader"] == serde_json::json!(1))
    })
    .unwrap_or_else(|| panic!("the founder never led:\n{}", cluster.logs()));

    for index in [2, 3] {
        let token = cluster.token(1, 600);
        assert!(token.starts_with("bmjoin1."), "{token}");
        let (ok, stdout, stderr) = cluster.join(index, &token, 1);
        assert!(ok, "join s{index}: {stderr}\n{}", cluster.logs());
        assert!(stdout.contains(&format!("as member {index}")), "{stdout}");
        // The token is single-use.
        let (ok, _, stderr) = cluster.bootmesh_as(
            index,
            &cluster.lab.path(&format!("again{index}")),
            &[
                "cluster",
                "join",
                "--token",
                &token,
                "--server",
                founder.as_str(),
                "--address",
                "10.70.0.99:7100",
            ],
        );
        assert!(
            !ok && stderr.contains("already used"),
            "reused token: {stderr}"
        );
        cluster.serve(index);
    }
    let formed = Instant::now();
    wait_for(Duration::from_secs(90), || {
        cluster.status(1).is_some_and(|status| voters(&status) == 3)
    })
    .unwrap_or_else(|| panic!("three voters never formed:\n{}", cluster.logs()));
    eprintln!(
        "three voters {:.1} s after the last join",
        formed.elapsed().as_secs_f64()
    );
    let status = cluster.status(3).expect("s3 answers");
    assert_eq!(status["leader"], serde_json::json!(1), "{status}");
    let (ok, table, _) = cluster.bootmesh(2, &["cluster", "members"]);
    assert!(
        ok && table.contains("leader") && table.contains("rack0"),
        "{table}"
    );

    // An expired token is refused.
    let short = cluster.token(1, 1);
    std::thread::sleep(Duration::from_secs(2));
    let (ok, _, stderr) = cluster.bootmesh_as(
        3,
        &cluster.lab.path("expired"),
        &[
            "cluster",
            "join",
            "--token",
            &short,
            "--server",
            founder.as_str(),
            "--address",
            "10.70.0.98:7100",
        ],
    );
    assert!(!ok && stderr.contains("expired"), "expired token: {stderr}");

    // A peer with a certificate of another CA is refused and logged.
    let stranger = cluster.lab.path("stranger");
    let (ok, _, stderr) = cluster.bootmesh_as(
        2,
        &stranger,
        &["cluster", "init", "--address", "10.70.0.2:7199"],
    );
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = cluster.bootmesh_as(
        2,
        &stranger,
        &["cluster", "status", "--server", founder.as_str()],
    );
    assert!(!ok, "a stranger got an answer: {stderr}");
    wait_for(Duration::from_secs(10), || {
        cluster.log(1).contains("cluster handshake failed")
    })
    .unwrap_or_else(|| panic!("the refusal was not logged:\n{}", cluster.log(1)));

    // kill -9 of the leader: another server leads, and takes requests.
    cluster.lab.signal("s1", libc::SIGKILL);
    let killed = Instant::now();
    let new_leader = wait_for(Duration::from_secs(60), || {
        cluster.status(2).is_some_and(|status| {
            status["leader"]
                .as_u64()
                .is_some_and(|leader| leader == 2 || leader == 3)
        })
    });
    let took = killed.elapsed();
    assert!(
        new_leader.is_some(),
        "no new leader within 60 s:\n{}",
        cluster.logs()
    );
    eprintln!(
        "new leader {:.1} s after kill -9 of the leader",
        took.as_secs_f64()
    );
    let token = cluster.token(3, 60);
    assert!(token.starts_with("bmjoin1."), "{token}");
}
