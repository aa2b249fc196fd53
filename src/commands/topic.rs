//! `fleetflow topic create`: the Kafka topic, with its partitions.

use fleetflow::cli::TopicCommand;

use super::out;

pub fn run(command: TopicCommand) -> anyhow::Result<()> {
    match command {
        TopicCommand::Create { kafka, partitions, replication } => {
            let kafka = fleetflow::config::KafkaConfig::from(kafka);
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(fleetflow::kafka::admin::create_topic(&kafka, partitions, replication))?;
            out(&format!("topic {:?} ready on {} ({partitions} partitions)\n", kafka.topic, kafka.brokers))
        }
    }
}
