//! The agent in-process, on its own runtime thread (one async worker, as the binary), so a test
//! can read its state directly (through a store, as the export does). Dropping it stops the agent and joins the thread
//! (within 30 s, else the test fails).

use std::time::Duration;

use virt_hypervisor_agent::agent::Agent;
use virt_hypervisor_agent::config::AgentConfig;
use virt_hypervisor_agent::state::Store;

#[derive(Debug)]
pub struct InProcess {
    pub store: Store,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    /// Build and run an agent with `cfg`; panics if it cannot start (a failed test).
    pub fn start(cfg: AgentConfig) -> InProcess {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("a tokio runtime");
            rt.block_on(async move {
                let agent = Agent::new(cfg).expect("agent builds");
                let _ = tx.send(agent.store());
                agent
                    .run(async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .expect("agent runs");
            });
            // A daemon hung by a test may still hold a blocking thread: do not wait for it.
            rt.shutdown_background();
        });
        let store = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the agent started");
        InProcess {
            store,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            // Bounded: an agent that cannot stop (its worker blocked) must fail the test, not
            // hang it.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else if !std::thread::panicking() {
                panic!("the in-process agent did not stop within 30 s");
            } else {
                eprintln!("the in-process agent did not stop within 30 s; left running");
            }
        }
    }
}
