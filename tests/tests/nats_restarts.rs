//! The server itself goes away: a private `nats-server -js` is stopped while the bridge
//! drains its stream and started again on the same port and store directory.
//! The bridge reconnects by itself and nothing is lost (the conformance scenario, with a
//! real restart instead of a cut connection).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_loses_nothing() {
    ferry_e2e::conformance::connection_loss_and_recovery(&ferry_e2e::conformance::nats::PrivateNats)
        .await;
}
