//! Dead letters `XADD`ed to the dead-letter stream.
//!
//! The dead letter and the acknowledgement of the original are one Lua script, which
//! Redis runs atomically: a crash, a cut connection or a failover cannot leave one done
//! without the other. (A `MULTI`/`EXEC` would not do: Redis runs the rest of a
//! transaction after a command in it fails, so an `XADD` refused at run time, say the key
//! became a list, would still let the `XACK` through and lose the entry. In the script
//! the failing `XADD` stops it before the `XACK`.) The script first checks that the entry
//! is still pending for this consumer: one another replica has taken over is its to
//! settle, and two dead letters of it would be one too many.
//!
//! A dead letter that fails is retried with backoff, the entry held (and kept from
//! looking idle) meanwhile; a refusal (the key holds something else) shows on `/routes`
//! until it goes through. At shutdown it gives up after a few tries and the entry stays
//! pending, to be read again.

use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use ferry_core::{DeadLetter, SourceContext};
use redis::{Script, Value};
use tokio::sync::mpsc;
use tracing::debug;

use crate::link::{Link, Request};
use crate::settle::{persist, Fields, Held, State};
use crate::DeadLetters;

/// The fields ferry adds to a dead letter, after the original ones: why (the endpoint's
/// answer or the engine's reason, cut to 1 KB), the last HTTP status (or `timeout`,
/// `error`, ... when there was none), the attempts made and the route. Original fields of
/// these names (an entry dead-lettered before) are replaced.
pub const DEAD_LETTER_FIELDS: [&str; 4] = [
    "ferry_reason",
    "ferry_status",
    "ferry_attempts",
    "ferry_route",
];

/// `KEYS[1]` the stream, `KEYS[2]` the dead-letter stream; `ARGV[1]` the group, `ARGV[2]`
/// the consumer, `ARGV[3]` the entry id, `ARGV[4]` the `MAXLEN` ("" for none), then the
/// fields and values. Returns 1 once added and acknowledged, 0 when the entry is not
/// pending for this consumer (nothing is done).
static ADD_AND_ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] or p[1][2] ~= ARGV[2] then
  return 0
end
local add = {'XADD', KEYS[2]}
if ARGV[4] ~= '' then
  add[#add + 1] = 'MAXLEN'
  add[#add + 1] = '~'
  add[#add + 1] = ARGV[4]
end
add[#add + 1] = '*'
for i = 5, #ARGV do
  add[#add + 1] = ARGV[i]
end
redis.call(unpack(add))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return 1
",
    )
});

/// One dead letter to write.
pub(crate) struct Op {
    pub(crate) held: Held,
    pub(crate) fields: Box<Fields>,
    pub(crate) why: DeadLetter,
}

/// Writes dead letters until every handle is gone; one at a time (they are rare, and
/// each is retried until it lands).
pub(crate) async fn run(
    mut link: Link,
    state: Arc<State>,
    mut rx: mpsc::UnboundedReceiver<Op>,
    ctx: SourceContext,
) {
    let DeadLetters::Stream { stream, max_len } = &state.config.dead_letters else {
        return;
    };
    let max_len = max_len.map(|n| n.to_string()).unwrap_or_default();
    while let Some(op) = rx.recv().await {
        let mut call = ADD_AND_ACK.key(&state.config.stream);
        call.key(stream)
            .arg(&state.config.group)
            .arg(state.consumer.as_ref())
            .arg(op.held.id.as_ref())
            .arg(&max_len);
        for (name, value) in op.fields.iter() {
            if !DEAD_LETTER_FIELDS
                .iter()
                .any(|f| f.as_bytes() == name.as_ref())
            {
                call.arg(name.as_ref()).arg(value.as_ref());
            }
        }
        for (name, value) in ferry_fields(&op.why, &ctx.route) {
            call.arg(name).arg(value.as_ref());
        }
        match persist(&ctx, "dead_letter", &mut link, &Request::Script(call)).await {
            Some(Value::Int(1)) => {
                ctx.counts.dead_lettered.inc();
            }
            Some(_) => debug!(route = %ctx.route, id = %op.held.id,
                "not dead-lettered here: another consumer has taken the entry over"),
            None => {}
        }
        state.forget(&op.held);
    }
}

fn ferry_fields(why: &DeadLetter, route: &str) -> [(&'static str, Bytes); 4] {
    let [reason, status, attempts, route_field] = DEAD_LETTER_FIELDS;
    [
        (reason, Bytes::from(why.reason.clone())),
        (status, Bytes::from(why.last_status())),
        (attempts, Bytes::from(why.attempts.to_string())),
        (route_field, Bytes::copy_from_slice(route.as_bytes())),
    ]
}
