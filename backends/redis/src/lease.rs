//! Idle-time leases. Redis has no ack deadline: an entry stays pending until acknowledged,
//! and what looks abandoned is an entry idle (not delivered, not claimed) for longer than
//! `claim_idle`, which any consumer's `XAUTOCLAIM` takes over. So an entry ferry holds,
//! however slow its endpoint, must not look idle: the core lease service renews it every
//! half `claim_idle` by resetting its idle time (`XCLAIM ... JUSTID`, to this consumer
//! itself, which counts no delivery).
//!
//! The reset and the check that the entry is still this consumer's are one script: a plain
//! `XCLAIM` with a minimum idle time of 0 would take an entry back from a consumer that
//! claimed it, and both would deliver it. An entry found to be another's is reported
//! taken, so the engine stops delivering it here (`is_current`).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ferry_core::lease::Renew;
use ferry_core::SourceContext;
use redis::{Script, ScriptInvocation, Value};
use tracing::warn;

use crate::link::Link;
use crate::settle::State;

/// Sets the idle time of those of the entries (`ARGV[4..]`) that are still pending for
/// this consumer (`ARGV[2]`) in the group (`ARGV[1]`) to `ARGV[3]` milliseconds; returns,
/// per entry, 1 when it was this consumer's, 0 when it is another's or no longer pending.
static SET_IDLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local stream, group, consumer, idle = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local mine = {}
for i = 4, #ARGV do
  local p = redis.call('XPENDING', stream, group, ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == consumer then
    redis.call('XCLAIM', stream, group, consumer, 0, ARGV[i], 'IDLE', idle, 'JUSTID')
    mine[#mine + 1] = 1
  else
    mine[#mine + 1] = 0
  end
end
return mine
",
    )
});

/// The script call that gives `ids` the idle time `idle`.
pub(crate) fn set_idle(
    state: &State,
    ids: &[impl AsRef<str>],
    idle: Duration,
) -> ScriptInvocation<'static> {
    let mut call = SET_IDLE.key(&state.config.stream);
    call.arg(&state.config.group)
        .arg(state.consumer.as_ref())
        .arg(u64::try_from(idle.as_millis()).unwrap_or(u64::MAX));
    for id in ids {
        call.arg(id.as_ref());
    }
    call
}

/// Renews held entries by resetting their idle time.
pub(crate) struct Idle {
    link: tokio::sync::Mutex<Link>,
    state: Arc<State>,
    ctx: SourceContext,
}

impl Idle {
    pub(crate) fn new(link: Link, state: Arc<State>, ctx: SourceContext) -> Self {
        Self {
            link: tokio::sync::Mutex::new(link),
            state,
            ctx,
        }
    }
}

/// Entries per script call: a script blocks Redis while it runs.
const CHUNK: usize = 256;

impl Renew<Arc<str>> for Idle {
    async fn renew(&self, due: Vec<Arc<str>>, _length: Duration) -> Vec<bool> {
        let mut link = self.link.lock().await;
        let mut extended = Vec::with_capacity(due.len());
        for chunk in due.chunks(CHUNK) {
            let call = set_idle(&self.state, chunk, Duration::ZERO);
            match link.invoke::<Vec<Value>>(&call).await {
                Ok(mine) => {
                    for (id, mine) in chunk
                        .iter()
                        .zip(mine.iter().chain(std::iter::repeat(&Value::Int(0))))
                    {
                        let ok = matches!(mine, Value::Int(1));
                        if !ok {
                            self.state.taken(id);
                        }
                        extended.push(ok);
                    }
                }
                Err(e) => {
                    self.ctx
                        .counts
                        .broker_errors
                        .count("renew", chunk.len() as u64);
                    warn!(route = %self.ctx.route, count = chunk.len(), error = %crate::setup::one_line(&e),
                        "resetting the idle time of held entries failed; trying again");
                    extended.extend(std::iter::repeat_n(false, chunk.len()));
                }
            }
        }
        extended
    }
}
