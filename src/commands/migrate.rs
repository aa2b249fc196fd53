//! `fleetflow migrate`: creates or upgrades the schema, then exits.

use fleetflow::cli::DatabaseArgs;

use super::out;

pub fn run(db: DatabaseArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let version = runtime.block_on(async {
        let mut client = fleetflow::sink::connect(&db.database_url).await?;
        fleetflow::sink::schema::migrate(&mut client, &db.database_url).await
    })?;
    out(&format!("schema at version {version}\n"))
}
