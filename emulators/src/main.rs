//! `sluice-emulator hubspot --listen 127.0.0.1:8081` or `sluice-emulator salesforce`: an
//! emulator to try a pipeline against.

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
    /// Salesforce: OAuth (JWT bearer, client credentials), upsert by external ID, Collections,
    /// Composite, Bulk API 2.0, the daily allocation, faults.
    Salesforce {
        #[arg(long, default_value = "127.0.0.1:8082")]
        listen: SocketAddr,
        #[arg(long, default_value = "3MVG9emulator")]
        client_id: String,
        #[arg(long, default_value = "emulator-secret")]
        client_secret: String,
        #[arg(long, default_value = "sync@example.com")]
        username: String,
        /// The connected app's certificate public key (PEM file), to accept JWT assertions.
        #[arg(long)]
        jwt_public_key: Option<std::path::PathBuf>,
        /// API requests per rolling 24 hours.
        #[arg(long, default_value_t = 100_000)]
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
        Api::Salesforce { listen, client_id, client_secret, username, jwt_public_key, daily_max } => {
            let jwt_public_key_pem = jwt_public_key.map(std::fs::read_to_string).transpose()?;
            let config = sluice_emulators::salesforce::Config {
                client_id,
                client_secret,
                username,
                jwt_public_key_pem,
                daily_max,
                ..Default::default()
            };
            let emulator = sluice_emulators::salesforce::start(config, listen).await?;
            eprintln!("Salesforce emulator on {} (objects Contact and Account, external id Ext_Id__c)", emulator.url());
            tokio::signal::ctrl_c().await?;
            Ok(())
        }
    }
}
