//! The shutdown signals: SIGTERM (Kubernetes stopping the pod) and SIGINT (Ctrl-C).

/// Which signal asked us to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: the orchestrator is replacing us; give endpoints time to update.
    Terminate,
    /// SIGINT: a person pressed Ctrl-C; stop promptly.
    Interrupt,
}

/// Completes when the process is asked to stop, saying how.
pub async fn shutdown_requested() -> Stop {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => Stop::Terminate,
                    _ = int.recv() => Stop::Interrupt,
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
                Stop::Interrupt
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        Stop::Interrupt
    }
}
