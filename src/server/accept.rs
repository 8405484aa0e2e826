//! Accepting: client connections (with `--max-clients` and descriptor
//! exhaustion handled), and scrapers of the metrics endpoint.

use super::*;

/// Raises the soft open-file limit to the hard limit and fits `wanted` into
/// what it allows, after the descriptors open now, a small reserve, and
/// `extra` more (the metrics connections, when the endpoint is on).
pub(super) fn fit_max_clients(wanted: Option<usize>, extra: usize) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            warn!("cannot raise the open-file limit: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    };
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let open = std::fs::read_dir("/proc/self/fd").map_or(16, |dir| dir.count());
    let fit = limit.saturating_sub(open + REJECT_SLOTS + SPARE_FDS + extra);
    match wanted {
        Some(wanted) if wanted > fit => {
            warn!(
                "--max-clients {wanted} does not fit the open-file limit of {limit}: lowered to \
                 {fit}; raise the hard limit (ulimit -Hn, LimitNOFILE= in systemd) to allow more"
            );
            fit
        }
        Some(wanted) => wanted,
        None => fit,
    }
}

/// Accept errors that concern one connection only (it was reset or refused
/// before we took it): skip it and accept the next.
pub(super) fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) || matches!(e.raw_os_error(), Some(libc::EPROTO | libc::EPERM))
}

/// Accept errors that mean the process or system is out of descriptors or
/// memory: retrying at once would spin.
pub(super) fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Connections over `--max-clients` that may linger at once to deliver
/// `error: server-full`; beyond that they get a best-effort write and a close.
pub(super) const REJECT_SLOTS: usize = 8;

/// Descriptors kept free besides those open at start and the reject slots.
pub(super) const SPARE_FDS: usize = 8;

/// How long accepting pauses after the process runs out of descriptors.
pub(super) const ACCEPT_BACKOFF_MS: u64 = 100;

impl Server {
    /// Accepts until `WouldBlock`. Errors never end the server: running out
    /// of descriptors (or kernel memory) pauses accepting for a moment, so
    /// the backlog waits instead of the loop spinning on a ready listener.
    pub(super) fn accept_all(&mut self) {
        if self.accept_resume_ms.is_some() {
            return;
        }
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, addr)) => {
                    self.accept_exhaustion_logged = false;
                    self.on_accept(stream, addr);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_transient_accept_error(&e) => {
                    debug!("accept: {e}");
                }
                Err(e) => {
                    if !is_resource_exhaustion(&e) {
                        warn!("accept failed: {e}; pausing accepts for {ACCEPT_BACKOFF_MS} ms");
                    } else if !self.accept_exhaustion_logged {
                        self.accept_exhaustion_logged = true;
                        warn!(
                            "accept failed: {e}; pausing accepts for {ACCEPT_BACKOFF_MS} ms at a \
                             time until descriptors free up (raise the open-file limit, or \
                             lower --max-clients)"
                        );
                    }
                    self.accept_resume_ms = Some(self.now_ms + ACCEPT_BACKOFF_MS);
                    return;
                }
            }
        }
    }

    /// Accepts scrapers until `WouldBlock`; past `metrics::MAX_CONNS` they
    /// are closed at once.
    pub(super) fn accept_metrics(&mut self) {
        loop {
            let Some(listener) = &self.metrics_listener else {
                return;
            };
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_transient_accept_error(&e) => continue,
                Err(e) => {
                    debug!("metrics accept: {e}");
                    return;
                }
            };
            if self.metrics.len() >= metrics::MAX_CONNS {
                continue; // dropped: closed
            }
            let entry = self.metrics.vacant_entry();
            let token = Token(METRICS_BASE + entry.key());
            if self
                .poll
                .registry()
                .register(&mut stream, token, Interest::READABLE)
                .is_ok()
            {
                entry.insert(MetricsConn::new(stream, self.now_ms + metrics::DEADLINE_MS));
            }
        }
    }

    /// Serves a scraper's event; closes it once answered or failed.
    pub(super) fn on_metrics_event(&mut self, token: usize) {
        let key = token - METRICS_BASE;
        let Server {
            metrics,
            stats,
            registry,
            pool,
            max_clients,
            poll,
            ..
        } = self;
        let Some(conn) = metrics.get_mut(key) else {
            return;
        };
        let gauges = Gauges {
            logged_in: registry.len(),
            max_clients: *max_clients,
            pooled_bytes: pool.pooled_bytes(),
        };
        match conn.on_event(|| metrics::render(stats, &gauges)) {
            Next::Wait => {}
            Next::WaitWritable => {
                let interest = Interest::READABLE | Interest::WRITABLE;
                if poll
                    .registry()
                    .reregister(&mut conn.stream, Token(token), interest)
                    .is_err()
                {
                    metrics.remove(key);
                }
            }
            Next::Close => {
                metrics.remove(key);
            }
        }
    }

    /// Registers a new connection, or turns it away when the server is full.
    pub(super) fn on_accept(&mut self, mut stream: TcpStream, addr: std::net::SocketAddr) {
        self.stats.accepted += 1;
        let full = self.conns.len() - self.rejecting >= self.max_clients;
        if full && self.rejecting >= REJECT_SLOTS {
            self.stats.rejected += 1;
            self.stats.error_sent(ErrorKind::ServerFull);
            let _ = (&stream).write(b"error: server-full\n");
            let _ = stream.shutdown(Shutdown::Write);
            return;
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, Token(key), Interest::READABLE)
        {
            warn!("cannot register connection from {addr}: {e}");
            return;
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        entry.insert(Conn::new(stream, id, self.now_ms as u32));
        self.peak_conns = self.peak_conns.max(self.conns.len());
        if full {
            self.stats.rejected += 1;
            self.rejecting += 1;
            self.conns[key].flags |= REJECTED;
            debug!("rejected {addr}: server full");
            self.close_with_error(key, ErrorKind::ServerFull, format_args!(""));
            return;
        }
        self.stats.opened();
        debug!("accepted {addr} as #{id}");
        if !self.config.login_timeout.is_zero() {
            self.add_timer(key, TimerKind::Login, millis(self.config.login_timeout));
        }
    }
}
