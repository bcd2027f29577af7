//! The synchronous Redis connections the store and the work queue share the
//! habits of: a small pool of idle connections for short commands, and
//! dedicated connections for what blocks (a `XREADGROUP … BLOCK`, a pub/sub
//! subscription).
//!
//! Each pooled call takes one connection (or connects), and returns it only
//! after success. A failed connection is dropped, never reused. A pooled
//! connection that turns out to be closed (Redis restarted, an idle timeout)
//! is retried once on a fresh connection: the command never reached Redis. A
//! call that times out is not retried (Redis may still be running it).

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use ::redis::{Client, Connection, RedisResult};

use super::store::{Result, StoreError};

/// Idle connections for reuse. The lock is held only to push or pop one
/// connection, never while a command runs.
pub(crate) struct Pool {
    client: Client,
    /// `host:port/db` or `socket/db`, for messages (never the URL: it may hold a password).
    server: String,
    idle: Mutex<Vec<Connection>>,
    /// Connect, read and write timeout of pooled connections.
    timeout: Duration,
    max_idle: usize,
}

impl Pool {
    /// Parses `url` (connects lazily, on the first call).
    pub(crate) fn open(url: &str, timeout: Duration, max_idle: usize) -> Result<Self> {
        let client = Client::open(url).map_err(|e| StoreError::Backend(format!("redis: invalid URL: {e}")))?;
        let info = client.get_connection_info();
        let server = format!("{}/{}", info.addr(), info.redis_settings().db());
        Ok(Self { client, server, idle: Mutex::new(Vec::new()), timeout, max_idle })
    }

    /// The server, safe to log.
    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Connection>> {
        // Only push and pop happen under the lock; a panic cannot leave it inconsistent.
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn connect(&self) -> RedisResult<Connection> {
        self.dedicated(self.timeout)
    }

    /// A connection of the caller's own (not pooled) whose reads wait up to
    /// `read_timeout`: longer than any `BLOCK` it will send.
    pub(crate) fn dedicated(&self, read_timeout: Duration) -> RedisResult<Connection> {
        let conn = self.client.get_connection_with_timeout(self.timeout)?;
        conn.set_read_timeout(Some(read_timeout))?;
        conn.set_write_timeout(Some(self.timeout))?;
        Ok(conn)
    }

    /// The error of a failed call, naming the server and the operation.
    pub(crate) fn error(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Backend(format!("redis ({}): {what}: {e}", self.server))
    }

    /// Runs `op` on a pooled connection (or a new one), retrying once on a new
    /// connection when a pooled one turns out to be closed.
    pub(crate) fn run<T>(&self, what: &str, op: impl Fn(&mut Connection) -> RedisResult<T>) -> Result<T> {
        let pooled = self.idle().pop();
        let outcome = match pooled {
            Some(mut conn) => match op(&mut conn) {
                // Closed while idle: the command never reached Redis.
                Err(e) if e.is_connection_dropped() && !e.is_timeout() => {
                    tracing::debug!(server = %self.server, error = %e, "redis: pooled connection was closed; reconnecting");
                    self.connect().and_then(|mut conn| op(&mut conn).map(|v| (v, conn)))
                }
                other => other.map(|v| (v, conn)),
            },
            None => self.connect().and_then(|mut conn| op(&mut conn).map(|v| (v, conn))),
        };
        // A connection that failed is dropped (its replies may be out of step);
        // only one that just succeeded goes back.
        let (value, conn) = outcome.map_err(|e| self.error(what, e))?;
        let mut idle = self.idle();
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
        Ok(value)
    }
}
