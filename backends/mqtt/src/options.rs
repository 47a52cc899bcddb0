//! From the route's settings to the MQTT client's options.

use rumqttc::v5::mqttbytes::v5::ConnectProperties;
use rumqttc::v5::MqttOptions;

use crate::{MqttConfig, MqttError};

/// The port of `mqtt://` URLs without one.
const DEFAULT_PORT: u16 = 1883;

/// MQTT's largest packet.
pub(crate) const MAX_PACKET: u32 = 268_435_455;

/// QoS 1 messages ferry may have published and not yet had acknowledged on a connection.
const OUTGOING: u16 = 8;

/// The options every connection of the route uses: its session (`clean_start = false`,
/// the expiry), manual acknowledgements, the receive window and the login.
pub(crate) fn build(config: &MqttConfig) -> Result<MqttOptions, MqttError> {
    let shown = ferry_core::redact::url(&config.url);
    let url = url::Url::parse(&config.url)
        .map_err(|e| MqttError::Url(format!("{shown:?} is not a URL: {e}")))?;
    if url.scheme() != "mqtt" {
        return Err(MqttError::Url(format!(
            "{shown:?}: only mqtt:// is built in (no TLS)"
        )));
    }
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| MqttError::Url(format!("{shown:?} has no host")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut options = MqttOptions::new(
        config.client_id.clone(),
        host,
        url.port().unwrap_or(DEFAULT_PORT),
    );
    options
        .set_clean_start(false)
        .set_manual_acks(true)
        .set_keep_alive(config.keep_alive)
        .set_connection_timeout(5)
        // What ferry itself publishes at once: dead letters, one at a time. rumqttc keeps a
        // slot for each message it may have out, 216 bytes each, allocated and written up
        // front: its default (65,535) made every connection 14 MiB resident.
        .set_outgoing_inflight_upper_limit(OUTGOING);
    let mut props = ConnectProperties::new();
    props.session_expiry_interval =
        Some(u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX));
    props.receive_maximum = Some(config.receive_maximum);
    // The client's default (10 KiB) would refuse ordinary messages; the broker keeps
    // from ferry anything larger than this, so this is MQTT's own limit.
    props.max_packet_size = Some(MAX_PACKET);
    options.set_connect_properties(props);
    if !url.username().is_empty() || url.password().is_some() {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        options.set_credentials(
            decode(url.username()),
            decode(url.password().unwrap_or_default()),
        );
    }
    Ok(options)
}
