//! `sluice-emulator hubspot --listen 127.0.0.1:8081`: an emulator to try a pipeline against.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;

#[derive(Parser)]
#[command(name = "sluice-emulator", about = "Conformance emulators of the APIs sluice writes to")]
struct Cli {
    #[command(subcommand)]
    api: Api,
}

#[derive(Subcommand)]
enum Api {
    /// HubSpot CRM: batch upsert/read/archive, tokens, rate limits, faults.
    Hubspot {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// A private-app token to accept (repeatable).
        #[arg(long = "token", default_value = "pat-na1-emulator")]
        tokens: Vec<String>,
        /// Requests per rolling 10 seconds.
        #[arg(long, default_value_t = 100)]
        ten_second_max: u32,
        /// Requests per day.
        #[arg(long, default_value_t = 250_000)]
        daily_max: u64,
    },
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    match Cli::parse().api {
        Api::Hubspot { listen, tokens, ten_second_max, daily_max } => {
            let config = sluice_emulators::hubspot::Config { tokens, ten_second_max, daily_max, ..Default::default() };
            let emulator = sluice_emulators::hubspot::start(config, listen).await?;
            eprintln!("HubSpot emulator on {} (control plane under /_emu/)", emulator.url());
            tokio::signal::ctrl_c().await?;
            Ok(())
        }
    }
}
