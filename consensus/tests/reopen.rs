//! What the state machine applied is there again after the store is reopened, row by row.

use consensus::state::{Member, MeshCommand, Proposal};
use consensus::store::{create_file, open_file};
use consensus::{MeshResponse, MeshTypeConfig};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

fn entry(index: u64, command: MeshCommand) -> Entry<MeshTypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Proposal { at: 1_000, command }),
    }
}

#[tokio::test]
async fn applied_rows_and_the_applied_id_survive_a_reopen() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("mesh.redb");
    let member = Member {
        id: 1,
        address: "10.0.0.1:7000".into(),
        rack: "r1".into(),
    };
    create_file(&path).expect("create");
    let before = {
        let (_log, mut state_machine) = open_file(&path).expect("open");
        let responses = state_machine
            .apply(vec![
                entry(1, MeshCommand::UpsertMember(member.clone())),
                entry(
                    2,
                    MeshCommand::CreateJoinToken {
                        secret_hash: "ab".into(),
                        expires_at: 60_000,
                    },
                ),
                entry(
                    3,
                    MeshCommand::TagImage {
                        reference: "k8s:v1".into(),
                        manifest: "cd".into(),
                        size_bytes: 7,
                    },
                ),
                entry(
                    4,
                    MeshCommand::RedeemJoinToken {
                        secret_hash: "ab".into(),
                        member: Member {
                            id: 0,
                            address: "10.0.0.2:7000".into(),
                            rack: "r2".into(),
                        },
                    },
                ),
            ])
            .await
            .expect("apply");
        assert_eq!(responses[3], MeshResponse::Joined { server_id: 2 });
        state_machine.state().read(Clone::clone)
    };
    let (_log, mut reopened) = open_file(&path).expect("reopen");
    assert_eq!(reopened.state().read(Clone::clone), before);
    let (applied, _) = reopened.applied_state().await.expect("applied state");
    assert_eq!(applied.map(|log_id| log_id.index), Some(4));
}
