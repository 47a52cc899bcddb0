//! Connections that come back: each [`Conn`] hands out its current session, or opens a
//! new one (listening again, statements prepared again) once the last one was lost.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Mutex, Notify};
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement};
use tracing::debug;

use crate::schema::Sql;

/// One connection and the source's statements prepared on it.
pub(crate) struct Session {
    pub(crate) client: Client,
    pub(crate) claim: Statement,
    pub(crate) done: Statement,
    pub(crate) retry: Statement,
    pub(crate) release: Statement,
    pub(crate) dead_letter: Statement,
    pub(crate) renew: Statement,
    pub(crate) backlog: Statement,
    pub(crate) next_due: Statement,
}

/// A connection that is opened again when it was lost.
pub(crate) struct Conn {
    config: tokio_postgres::Config,
    sql: Arc<Sql>,
    /// `LISTEN` on this connection, and whom its notifications (and its loss) wake.
    listen: Option<(String, Arc<Notify>)>,
    current: Mutex<Option<Arc<Session>>>,
}

/// How the driver of a connection says it ended.
fn connection_ended(wake: Option<&Notify>) {
    if let Some(wake) = wake {
        wake.notify_one();
    }
}

impl Conn {
    /// Connections to `config` that prepare `sql`; with `listen` (the channel and whom
    /// to wake) they `LISTEN` first.
    pub(crate) fn new(
        config: tokio_postgres::Config,
        sql: Arc<Sql>,
        listen: Option<(&str, Arc<Notify>)>,
    ) -> Self {
        Self {
            config,
            sql,
            listen: listen
                .map(|(channel, wake)| (format!("LISTEN {}", crate::schema::ident(channel)), wake)),
            current: Mutex::new(None),
        }
    }

    /// The current session, or a new one when there is none or it was lost.
    pub(crate) async fn session(&self) -> Result<Arc<Session>, tokio_postgres::Error> {
        let mut current = self.current.lock().await;
        if let Some(session) = current.as_ref().filter(|s| !s.client.is_closed()) {
            return Ok(session.clone());
        }
        *current = None;
        let (client, mut connection) = self.config.connect(NoTls).await?;
        let wake = self.listen.as_ref().map(|(_, wake)| wake.clone());
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => {
                        if let Some(wake) = &wake {
                            wake.notify_one();
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        debug!(error = %ferry_core::error_chain(&e), "connection to PostgreSQL ended");
                        break;
                    }
                }
            }
            connection_ended(wake.as_deref());
        });
        if let Some((listen, _)) = &self.listen {
            client.batch_execute(listen).await?;
        }
        let session = Arc::new(prepare(client, &self.sql).await?);
        *current = Some(session.clone());
        Ok(session)
    }

    /// Forgets the session after a failed call, so that the next call opens a new one
    /// (a statement that failed for another reason than the connection leaves it open).
    pub(crate) async fn drop_session(&self) {
        *self.current.lock().await = None;
    }
}

async fn prepare(client: Client, sql: &Sql) -> Result<Session, tokio_postgres::Error> {
    let prepared =
        futures::future::try_join_all(sql.all().map(|(_, text)| client.prepare(text))).await?;
    // `Sql::all` lists the statements in this order.
    let Ok([claim, done, retry, release, dead_letter, renew, backlog, next_due]) =
        <[Statement; 8]>::try_from(prepared)
    else {
        unreachable!("one prepared statement for each of Sql::all");
    };
    Ok(Session {
        client,
        claim,
        done,
        retry,
        release,
        dead_letter,
        renew,
        backlog,
        next_due,
    })
}

/// The client settings every connection uses: a connect timeout, and keepalives short
/// enough that a connection the network silently dropped is noticed within a minute.
pub(crate) fn tune(config: &mut tokio_postgres::Config, route: &str) {
    config
        .application_name(format!("ferry/{route}"))
        .connect_timeout(Duration::from_secs(10))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(15))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(30));
}

/// One line for a client error: the server's own message (with its detail and hint) when
/// it answered, else the chain of causes.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut line = db.message().to_owned();
            if let Some(detail) = db.detail() {
                line.push_str(&format!(" ({detail})"));
            }
            if let Some(hint) = db.hint() {
                line.push_str(&format!("; {hint}"));
            }
            line.replace(['\n', '\r'], " ")
        }
        None => ferry_core::error_chain(e),
    }
}
