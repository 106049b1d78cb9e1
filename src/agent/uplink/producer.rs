//! The Kafka side of the uplink: librdkafka settings, the delivery-report context, and how
//! each send error is classified (retry later, dead-letter, rebuild the producer).

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tokio::sync::mpsc;

use super::acker::Bucket;
use super::{UplinkConfig, UplinkError};

/// The librdkafka producer configuration this uplink uses.
pub fn client_config(cfg: &UplinkConfig) -> Result<ClientConfig, UplinkError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", &cfg.compression)
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("message.timeout.ms", cfg.message_timeout_ms.to_string())
        .set("message.max.bytes", cfg.message_max_bytes.to_string())
        .set(
            "queue.buffering.max.messages",
            (cfg.max_in_flight * 2).max(1000).to_string(),
        )
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "2000")
        .set("socket.keepalive.enable", "true")
        .set("log_level", "3");
    cfg.security
        .apply(&mut c)
        .map_err(|e| UplinkError::Secret {
            path: e.path,
            source: e.source,
        })?;
    crate::kafka::check_passthrough(&cfg.librdkafka, crate::kafka::PRODUCER_PROTECTED)?;
    for (k, v) in &cfg.librdkafka {
        c.set(k, v);
    }
    Ok(c)
}

/// How one delivery ended.
#[derive(Debug)]
pub(super) enum Outcome {
    Delivered,
    /// Not delivered now; the row stays and goes again later.
    Retry(String),
    /// Refused with an error off the retriable allowlist: the row is parked in the outbox's
    /// dead-letter table, unless nothing else is being delivered either (then it is the
    /// link's fault, not the row's, and the row is kept; see `Uplink::settle_failure`).
    Refused(String),
    /// The credentials or ACLs refuse us: keep everything, back off hard.
    Unauthorized(String),
}

/// The allowlist: errors after which the same row can be delivered later, unchanged
/// (connections, timeouts, leadership and metadata moving, replicas catching up, quotas,
/// the idempotent producer's sequence state, purges when the producer is replaced).
/// Anything else refuses the row itself, e.g. `InvalidRecord`, `CorruptMessage`,
/// `MessageSizeTooLarge`, `InvalidTimestamp`, `PolicyViolation`.
pub(super) fn is_retriable(c: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as E;
    matches!(
        c,
        E::BrokerTransportFailure
            | E::Resolve
            | E::MessageTimedOut
            | E::UnknownPartition
            | E::UnknownTopic
            | E::AllBrokersDown
            | E::OperationTimedOut
            | E::QueueFull
            | E::ISRInsufficient
            | E::NodeUpdate
            | E::WaitingForCoordinator
            | E::InProgress
            | E::PreviousInProgress
            | E::TimedOutQueue
            | E::WaitCache
            | E::Interrupted
            | E::Retry
            | E::PurgeQueue
            | E::PurgeInflight
            | E::Fatal
            | E::Outdated
            | E::UnknownBroker
            | E::DestroyBroker
            | E::BrokerDestroy
            | E::Fenced
            | E::UnknownTopicOrPartition
            | E::LeaderNotAvailable
            | E::NotLeaderForPartition
            | E::RequestTimedOut
            | E::BrokerNotAvailable
            | E::ReplicaNotAvailable
            | E::NetworkException
            | E::CoordinatorLoadInProgress
            | E::CoordinatorNotAvailable
            | E::NotCoordinator
            | E::NotEnoughReplicas
            | E::NotEnoughReplicasAfterAppend
            | E::NotController
            | E::OutOfOrderSequenceNumber
            | E::InvalidProducerEpoch
            | E::UnknownProducerId
            | E::ConcurrentTransactions
            | E::KafkaStorageError
            | E::FencedLeaderEpoch
            | E::UnknownLeaderEpoch
            | E::OffsetNotAvailable
            | E::PreferredLeaderNotAvailable
            | E::EligibleLeadersNotAvailable
            | E::ThrottlingQuotaExceeded
            | E::ProducerFenced
            | E::RebootstrapRequired
    )
}

pub(super) fn classify(e: &KafkaError) -> Outcome {
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::Authentication,
        ) => Outcome::Unauthorized(e.to_string()),
        // Not a broker or librdkafka code (client plumbing): nothing says the row is at fault.
        None => Outcome::Retry(e.to_string()),
        Some(c) if is_retriable(c) => Outcome::Retry(e.to_string()),
        Some(_) => Outcome::Refused(format!("refused by the broker: {e}")),
    }
}

/// What one `send` did.
pub(super) enum Sent {
    /// Queued in librdkafka; a delivery report will follow.
    Queued,
    /// Queue full or bandwidth cap reached: try again after some deliveries.
    Backpressure,
    /// Refused outright (too large, bad configuration, ...).
    Failed(KafkaError),
}

/// Hands one row to librdkafka (which copies key and payload), minding the bandwidth cap.
pub(super) fn send_one(
    producer: &Kafka,
    topic: &str,
    bucket: &mut Option<Bucket>,
    seq: u64,
    key: &str,
    payload: &[u8],
) -> Sent {
    if let Some(b) = bucket {
        if !b.take(payload.len() as u64) {
            return Sent::Backpressure;
        }
    }
    let record = BaseRecord::with_opaque_to(topic, Box::new(seq))
        .key(key.as_bytes())
        .payload(payload);
    match producer.send(record) {
        Ok(()) => Sent::Queued,
        Err((e, _)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
            Sent::Backpressure
        }
        Err((e, _)) => Sent::Failed(e),
    }
}

/// librdkafka calls `delivery` (on the producer's polling thread) for every message; the
/// outcome and the row's seq go to the drain loop over a channel.
pub(super) struct Reports {
    tx: mpsc::UnboundedSender<(u64, Outcome)>,
}

/// Sent on the report channel instead of a seq when librdkafka reports every broker down.
pub(super) const LINK_DOWN: u64 = u64::MAX;
/// Sent instead of a seq with any other client-wide error (a TLS handshake or a SASL login
/// that failed, say): the operator's reason why nothing goes through.
pub(super) const LINK_ERROR: u64 = u64::MAX - 1;

impl ClientContext for Reports {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::AllBrokersDown)) {
            let _ = self
                .tx
                .send((LINK_DOWN, Outcome::Retry(reason.to_string())));
        } else {
            tracing::warn!("librdkafka: {error}: {reason}");
            let _ = self
                .tx
                .send((LINK_ERROR, Outcome::Retry(format!("{error}: {reason}"))));
        }
    }
}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<u64>;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(_) => Outcome::Delivered,
            Err((e, _)) => classify(e),
        };
        let _ = self.tx.send((*seq, outcome));
    }
}

pub(super) type Kafka = ThreadedProducer<Reports>;

pub(super) fn producer(
    cfg: &UplinkConfig,
    tx: &mpsc::UnboundedSender<(u64, Outcome)>,
) -> Result<Kafka, UplinkError> {
    client_config(cfg)?
        .create_with_context(Reports { tx: tx.clone() })
        .map_err(UplinkError::Config)
}

/// A cheap hasher for seq numbers (the in-flight set is touched twice per message).
#[derive(Clone, Copy, Default)]
pub(super) struct SeqHash;

impl std::hash::BuildHasher for SeqHash {
    type Hasher = SeqHasher;
    fn build_hasher(&self) -> SeqHasher {
        SeqHasher(0)
    }
}

#[derive(Default)]
pub(super) struct SeqHasher(u64);

impl std::hash::Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x100000001b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowlisted_errors_are_retried() {
        let produce = |c| KafkaError::MessageProduction(c);
        for c in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::NotEnoughReplicas,
        ] {
            assert!(matches!(classify(&produce(c)), Outcome::Retry(_)), "{c:?}");
        }
        // Off the list: refused, whatever librdkafka adds tomorrow.
        for c in [
            RDKafkaErrorCode::InvalidRecord,
            RDKafkaErrorCode::InvalidMessage,
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::InvalidTimestamp,
            RDKafkaErrorCode::PolicyViolation,
            RDKafkaErrorCode::UnsupportedForMessageFormat,
        ] {
            assert!(
                matches!(classify(&produce(c)), Outcome::Refused(_)),
                "{c:?}"
            );
        }
        assert!(matches!(
            classify(&produce(RDKafkaErrorCode::TopicAuthorizationFailed)),
            Outcome::Unauthorized(_)
        ));
    }
}
