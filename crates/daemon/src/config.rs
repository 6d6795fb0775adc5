//! The daemon's settings: command-line flags, optionally merged over a TOML file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde::Deserialize;

/// Command-line flags of `parallaxd`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "parallaxd",
    version,
    about = "Serve Parallax VDIs to virtual machines over NBD and the blkif ring",
    after_help = "Examples:\n  parallaxd --store /var/lib/parallax/blockstore.dat\n  parallaxd --store ./blockstore.dat --nbd 127.0.0.1:10809 --snapshot-every 10s --keep 60\n\nExports: each VDI by name and by id (read-write, one writer at a time) and each snapshot\nread-only as NAME@SNAPSHOT. `vdi` commands on the same store go through the daemon.\n\nLogging: PARALLAX_LOG sets the level or a filter (error, warn, info [default], debug, trace;\nor e.g. `info,nbd=debug`); logs go to stderr, coloured only on a terminal."
)]
pub struct Flags {
    /// The block store (file or block device, or `rados:POOL[/NAMESPACE]` in a Ceph
    /// cluster); created if missing.
    #[arg(long, env = "PARALLAX_STORE", default_value = "blockstore.dat")]
    pub store: PathBuf,
    /// With a `rados:` store: the cluster's ceph.conf [default: librados' search, /etc/ceph/ceph.conf].
    #[arg(long, env = "PARALLAX_CEPH_CONF", value_name = "FILE")]
    pub ceph_conf: Option<PathBuf>,
    /// With a `rados:` store: the Ceph client id, without `client.` [default: admin].
    #[arg(long, env = "PARALLAX_CEPH_ID", value_name = "ID")]
    pub ceph_id: Option<String>,
    /// With a `rados:` store: this host's name in the store's lease [default: the host name].
    #[arg(long, env = "PARALLAX_HOST", value_name = "NAME")]
    pub host: Option<String>,
    /// With a `rados:` store: how long the lease lasts unrenewed, i.e. how soon another host may
    /// take over after this one dies [default: 15s; at least 3s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub lease: Option<Duration>,
    /// TCP address for NBD clients [default: 127.0.0.1:10809] ("none" to disable).
    #[arg(long)]
    pub nbd: Option<String>,
    /// Unix socket for NBD clients.
    #[arg(long)]
    pub nbd_socket: Option<PathBuf>,
    /// Unix socket where simulated Xen guests (blkfront processes) attach over the blkif ring.
    #[arg(long)]
    pub ring_socket: Option<PathBuf>,
    /// Worker threads per ring (requests of one guest executed concurrently).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub ring_workers: Option<u16>,
    /// Serve Xen guests from dom0: the backend half of blkif over xenstore, gntdev and evtchn
    /// (needs a build with `--features xen`; see docs/xen.md).
    #[arg(long)]
    pub xen: bool,
    /// Queues (rings) a Xen guest may use per disk (`multi-queue-max-queues`); each is a thread
    /// with `--ring-workers` workers. Default: the CPUs parallaxd may run on, at most 16.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub xen_max_queues: Option<u32>,
    /// Allow a non-loopback NBD address (NBD has no authentication: use a trusted network).
    #[arg(long)]
    pub allow_remote: bool,
    /// TOML file with the same settings (flags win).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Take a snapshot of every served VDI this often (e.g. 10ms, 30s, 5m). Below 1s, the
    /// snapshots and their retention are durable at the guest's next flush, or the schedule's
    /// own commit about a second later; from 1s up, each round is committed before the next.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub snapshot_every: Option<Duration>,
    /// Only schedule snapshots of these VDIs (name or id; repeatable). Default: all.
    #[arg(long = "snapshot-vdi")]
    pub snapshot_vdis: Vec<String>,
    /// Keep at most this many scheduled snapshots per VDI.
    #[arg(long)]
    pub keep: Option<usize>,
    /// Delete scheduled snapshots older than this.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub keep_for: Option<Duration>,
    /// Metadata blocks to cache in memory (4 KiB each).
    #[arg(long)]
    pub cache_blocks: Option<usize>,
    /// NBD sessions served at once (connections past the handshake); beyond it a client is
    /// refused with a message [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// NBD connections still in their handshake at once; when full, a newcomer replaces the
    /// oldest one that has had a second [default: 128].
    #[arg(long, value_name = "N")]
    pub max_handshakes: Option<usize>,
    /// MiB of NBD payload (write data not yet written, read data not yet sent) all
    /// connections together may hold in memory; a connection needing more waits [default: 1024].
    #[arg(long, value_name = "MIB")]
    pub max_buffered_mib: Option<u64>,
    /// Requests of one NBD connection executed at once (threads per connection) [default: 4 for
    /// a store in a file, 16 for one in RADOS, where every request waits on a network round trip].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub nbd_workers: Option<u16>,
    /// MiB of write data one NBD connection may read ahead of its replies [default: 64].
    #[arg(long, value_name = "MIB")]
    pub max_buffered_mib_per_connection: Option<u64>,
    /// Microseconds an NBD connection's reader polls for the client's next request before it
    /// blocks, once the client's requests come quickly (adaptive; 0 turns polling off)
    /// [default: 32].
    #[arg(long, value_name = "US", value_parser = clap::value_parser!(u16).range(0..=1000))]
    pub nbd_poll_us: Option<u16>,
    /// NBD readers that may poll at once across the daemon [default: half the CPUs].
    #[arg(long, value_name = "N")]
    pub nbd_pollers: Option<usize>,
    /// Offer TLS on NBD (NBD_OPT_STARTTLS) with this PEM certificate chain (needs --tls-key).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Require every TLS client to present a certificate signed by this PEM authority.
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// Refuse everything but NBD_OPT_STARTTLS until a client has upgraded to TLS. With
    /// --tls-client-ca this is authentication, and NBD may listen off loopback without
    /// --allow-remote.
    #[arg(long)]
    pub tls_required: bool,
    /// Serve Prometheus metrics (per-VDI I/O counters and latency, clients, space) over HTTP
    /// at this address, path /metrics (loopback unless --allow-remote).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Serve a VDI (or a snapshot, read-only: VDI@SNAP) to a VMM over vhost-user-blk on this
    /// Unix socket (repeatable), e.g. /run/parallax/vm1.sock=vm1. QEMU: -chardev
    /// socket,id=c,path=SOCKET -device vhost-user-blk-pci,chardev=c with shared guest memory.
    #[arg(long = "vhost-user-blk", value_name = "SOCKET=VDI")]
    pub vhost_user_blk: Vec<String>,
    /// Request queues offered on each vhost-user-blk device [default: 2].
    #[arg(long, value_name = "N")]
    pub vhost_user_queues: Option<usize>,
    /// Requests of one vhost-user-blk queue executed at once (threads per queue) [default: 4].
    #[arg(long, value_name = "N")]
    pub vhost_user_workers: Option<usize>,
}

/// The same settings as a TOML file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    store: Option<PathBuf>,
    ceph_conf: Option<PathBuf>,
    ceph_id: Option<String>,
    host: Option<String>,
    lease: Option<String>,
    nbd: Option<String>,
    nbd_socket: Option<PathBuf>,
    ring_socket: Option<PathBuf>,
    ring_workers: Option<u16>,
    xen: Option<bool>,
    xen_max_queues: Option<u32>,
    allow_remote: Option<bool>,
    snapshot_every: Option<String>,
    snapshot_vdis: Option<Vec<String>>,
    keep: Option<usize>,
    keep_for: Option<String>,
    cache_blocks: Option<usize>,
    metrics: Option<String>,
    max_connections: Option<usize>,
    max_handshakes: Option<usize>,
    max_buffered_mib: Option<u64>,
    max_buffered_mib_per_connection: Option<u64>,
    nbd_workers: Option<u16>,
    nbd_poll_us: Option<u16>,
    nbd_pollers: Option<usize>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    tls_required: Option<bool>,
    vhost_user_blk: Option<Vec<String>>,
    vhost_user_queues: Option<usize>,
    vhost_user_workers: Option<usize>,
}

/// A snapshot schedule and its retention.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Interval between snapshots.
    pub every: Duration,
    /// VDIs to snapshot (names or ids); empty means all.
    pub vdis: Vec<String>,
    /// Scheduled snapshots kept per VDI (newest first), if limited.
    pub keep: Option<usize>,
    /// Age after which scheduled snapshots are deleted, if limited.
    pub keep_for: Option<Duration>,
}

/// The daemon's resolved settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The block store.
    pub store: PathBuf,
    /// How to reach a `rados:` store.
    pub rados: rados::RadosOptions,
    /// TCP address for NBD, if any.
    pub nbd: Option<SocketAddr>,
    /// Unix socket for NBD, if any.
    pub nbd_socket: Option<PathBuf>,
    /// Unix socket for simulated blkif guests, if any.
    pub ring_socket: Option<PathBuf>,
    /// Worker threads per ring.
    pub ring_workers: usize,
    /// Serve real Xen guests (feature `xen`).
    pub xen: bool,
    /// Queues a Xen guest may use per disk; `None`: one per CPU we may run on.
    pub xen_max_queues: Option<u32>,
    /// Snapshot schedule, if any.
    pub schedule: Option<Schedule>,
    /// Metadata cache size in blocks.
    pub cache_blocks: usize,
    /// Address of the Prometheus endpoint, if any.
    pub metrics: Option<SocketAddr>,
    /// Bounds of the NBD servers.
    pub nbd_limits: nbd::Limits,
    /// vhost-user-blk sockets and the export (VDI or VDI@SNAP) each serves.
    pub vhost_user_blk: Vec<(PathBuf, String)>,
    /// Request queues of each vhost-user-blk device.
    pub vhost_user_queues: usize,
    /// Requests of one vhost-user-blk queue executed at once.
    pub vhost_user_workers: usize,
}

fn duration(s: &str, what: &str) -> Result<Duration> {
    humantime::parse_duration(s).with_context(|| format!("{what}: '{s}' is not a duration like 10ms, 30s or 1h"))
}

impl Config {
    /// Resolves flags over the optional file.
    pub fn from_flags(flags: Flags) -> Result<Config> {
        let file = match &flags.config {
            Some(p) => load_file(p)?,
            None => FileConfig::default(),
        };
        let store = if flags.store != Path::new("blockstore.dat") {
            flags.store.clone()
        } else {
            file.store.unwrap_or(flags.store)
        };
        let allow_remote = flags.allow_remote || file.allow_remote.unwrap_or(false);
        let tls = tls_settings(
            flags.tls_cert.or(file.tls_cert),
            flags.tls_key.or(file.tls_key),
            flags.tls_client_ca.or(file.tls_client_ca),
            flags.tls_required || file.tls_required.unwrap_or(false),
        )?;
        // Clients proving who they are with certificates is authentication.
        let authenticated = tls.as_ref().is_some_and(|t| t.required() && t.client_auth());
        let nbd_text = flags.nbd.or(file.nbd).unwrap_or_else(|| "127.0.0.1:10809".to_string());
        let nbd = if nbd_text == "none" {
            None
        } else {
            let addr: SocketAddr = nbd_text
                .parse()
                .with_context(|| format!("--nbd '{nbd_text}' is not an address like 127.0.0.1:10809"))?;
            if !addr.ip().is_loopback() && !allow_remote && !authenticated {
                bail!(
                    "--nbd {addr} is not a loopback address; NBD without TLS client certificates has no authentication, so pass --tls-required with --tls-client-ca, or --allow-remote if this network is trusted"
                );
            }
            Some(addr)
        };
        let metrics = match flags.metrics.or(file.metrics) {
            None => None,
            Some(text) => {
                let addr: SocketAddr = text
                    .parse()
                    .with_context(|| format!("--metrics '{text}' is not an address like 127.0.0.1:9311"))?;
                if !addr.ip().is_loopback() && !allow_remote {
                    bail!("--metrics {addr} is not a loopback address; pass --allow-remote if this network is trusted");
                }
                Some(addr)
            }
        };
        let every = match (flags.snapshot_every, &file.snapshot_every) {
            (Some(d), _) => Some(d),
            (None, Some(s)) => Some(duration(s, "snapshot_every")?),
            _ => None,
        };
        let keep_for = match (flags.keep_for, &file.keep_for) {
            (Some(d), _) => Some(d),
            (None, Some(s)) => Some(duration(s, "keep_for")?),
            _ => None,
        };
        if let Some(e) = every
            && e < Duration::from_millis(10)
        {
            bail!("--snapshot-every {e:?} is below the 10ms minimum");
        }
        let schedule = every.map(|every| Schedule {
            every,
            vdis: if flags.snapshot_vdis.is_empty() {
                file.snapshot_vdis.unwrap_or_default()
            } else {
                flags.snapshot_vdis
            },
            keep: flags.keep.or(file.keep),
            keep_for,
        });
        let in_rados = rados::RadosLocation::names(&store);
        let lease = match (flags.lease, &file.lease) {
            (Some(d), _) => d,
            (None, Some(s)) => duration(s, "lease")?,
            (None, None) => rados::lease::DEFAULT_LEASE,
        };
        if lease < rados::lease::MIN_LEASE {
            bail!("--lease {lease:?} is below the 3s minimum (it is renewed every third of it)");
        }
        let rados = rados::RadosOptions {
            ceph: rados::CephOptions { conf: flags.ceph_conf.or(file.ceph_conf), id: flags.ceph_id.or(file.ceph_id) },
            host: flags.host.or(file.host).unwrap_or_else(rados::local_host_name),
            lease,
        };
        Ok(Config {
            store,
            rados,
            nbd,
            nbd_socket: flags.nbd_socket.or(file.nbd_socket),
            ring_socket: flags.ring_socket.or(file.ring_socket),
            xen: xen_enabled(flags.xen || file.xen.unwrap_or(false))?,
            xen_max_queues: match flags.xen_max_queues.or(file.xen_max_queues) {
                Some(n) if !(1..=16).contains(&n) => bail!("xen_max_queues must be from 1 to 16, not {n}"),
                n => n,
            },
            ring_workers: usize::from(flags.ring_workers.or(file.ring_workers).unwrap_or(4).clamp(1, 64)),
            schedule,
            cache_blocks: flags.cache_blocks.or(file.cache_blocks).unwrap_or(65536),
            metrics,
            vhost_user_blk: {
                let list = if flags.vhost_user_blk.is_empty() {
                    file.vhost_user_blk.unwrap_or_default()
                } else {
                    flags.vhost_user_blk
                };
                list.iter().map(|s| vhost_user_blk(s)).collect::<Result<Vec<_>>>()?
            },
            vhost_user_queues: flags.vhost_user_queues.or(file.vhost_user_queues).unwrap_or(2).clamp(1, 64),
            vhost_user_workers: flags.vhost_user_workers.or(file.vhost_user_workers).unwrap_or(4).clamp(1, 64),
            nbd_limits: {
                let d = nbd::Limits::default();
                let mib = |flag: Option<u64>, key: Option<u64>| flag.or(key).map(|m| m.saturating_mul(1 << 20));
                nbd::Limits {
                    max_connections: flags.max_connections.or(file.max_connections).unwrap_or(d.max_connections),
                    max_handshakes: flags.max_handshakes.or(file.max_handshakes).unwrap_or(d.max_handshakes),
                    max_buffered_bytes_per_conn: mib(
                        flags.max_buffered_mib_per_connection,
                        file.max_buffered_mib_per_connection,
                    )
                    .unwrap_or(d.max_buffered_bytes_per_conn),
                    // One pool for every NBD server of the daemon (TCP and Unix share it).
                    buffers: mib(flags.max_buffered_mib, file.max_buffered_mib)
                        .map_or(d.buffers.clone(), nbd::BufferPool::new),
                    workers_per_conn: match flags.nbd_workers.or(file.nbd_workers) {
                        Some(n) => usize::from(n).clamp(1, 256),
                        None if in_rados => 16,
                        None => d.workers_per_conn,
                    },
                    polling: {
                        let longest = match flags.nbd_poll_us.or(file.nbd_poll_us) {
                            Some(us) if us > 1000 => bail!("nbd_poll_us is {us}: at most 1000 microseconds"),
                            Some(us) => Duration::from_micros(u64::from(us)),
                            // Not the default limits' time: on one CPU they poll not at all,
                            // and `--nbd-pollers` alone must still poll.
                            None => nbd::DEFAULT_POLL,
                        };
                        let pollers = flags.nbd_pollers.or(file.nbd_pollers).unwrap_or(d.polling.max_pollers());
                        nbd::InputPolling::new(longest, pollers)
                    },
                    tls,
                    ..d
                }
            },
        })
    }
}

/// One `SOCKET=EXPORT` of `--vhost-user-blk`.
fn vhost_user_blk(text: &str) -> Result<(PathBuf, String)> {
    match text.split_once('=') {
        Some((socket, export)) if !socket.is_empty() && !export.is_empty() => {
            Ok((PathBuf::from(socket), export.to_string()))
        }
        _ => bail!("--vhost-user-blk '{text}' is not SOCKET=VDI (e.g. /run/parallax/vm1.sock=vm1)"),
    }
}

/// The NBD TLS settings, if a certificate is given.
fn tls_settings(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    required: bool,
) -> Result<Option<nbd::TlsSettings>> {
    match (cert, key) {
        (None, None) => {
            if required || client_ca.is_some() {
                bail!("--tls-required and --tls-client-ca need --tls-cert and --tls-key");
            }
            Ok(None)
        }
        (Some(cert), Some(key)) => nbd::TlsSettings::from_pem_files(&cert, &key, client_ca.as_deref(), required)
            .map(Some)
            .context("setting up TLS for NBD"),
        _ => bail!("--tls-cert and --tls-key go together"),
    }
}

fn xen_enabled(wanted: bool) -> Result<bool> {
    if wanted && !cfg!(feature = "xen") {
        bail!(
            "--xen: this parallaxd was built without Xen support; build it with `cargo build --release --features xen`"
        );
    }
    Ok(wanted)
}

fn load_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing the config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        Flags::try_parse_from(std::iter::once("parallaxd").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn remote_address_needs_allow_remote() {
        assert!(Config::from_flags(flags(&["--nbd", "0.0.0.0:10809"])).is_err());
        assert!(Config::from_flags(flags(&["--nbd", "0.0.0.0:10809", "--allow-remote"])).is_ok());
        assert!(Config::from_flags(flags(&["--nbd", "[::1]:10809"])).is_ok());
    }

    #[test]
    fn schedule_below_10ms_is_refused_and_file_values_apply() {
        assert!(Config::from_flags(flags(&["--snapshot-every", "5ms"])).is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.toml");
        std::fs::write(&p, "store = \"/x/s.dat\"\nsnapshot_every = \"20ms\"\nkeep = 3\nnbd = \"none\"\n").unwrap();
        let c = Config::from_flags(flags(&["--config", p.to_str().unwrap()])).unwrap();
        assert_eq!(c.store, PathBuf::from("/x/s.dat"));
        assert!(c.nbd.is_none());
        let s = c.schedule.unwrap();
        assert_eq!(s.every, Duration::from_millis(20));
        assert_eq!(s.keep, Some(3));
        std::fs::write(&p, "bogus = 1\n").unwrap();
        assert!(Config::from_flags(flags(&["--config", p.to_str().unwrap()])).is_err());
    }

    #[test]
    fn nbd_polling_comes_from_flags_or_the_file_and_is_bounded() {
        // One CPU polls not at all unless asked; more poll 32 µs, half of them at once.
        let default = Config::from_flags(flags(&[])).unwrap().nbd_limits.polling;
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let expected = if cpus / 2 == 0 { Duration::ZERO } else { Duration::from_micros(32) };
        assert_eq!((default.longest(), default.max_pollers()), (expected, cpus / 2));
        // Pollers alone poll for the default time, even where the default is no pollers.
        let c = Config::from_flags(flags(&["--nbd-pollers", "2"])).unwrap();
        assert_eq!((c.nbd_limits.polling.longest(), c.nbd_limits.polling.max_pollers()), (nbd::DEFAULT_POLL, 2));
        let c = Config::from_flags(flags(&["--nbd-poll-us", "100", "--nbd-pollers", "3"])).unwrap();
        assert_eq!(
            (c.nbd_limits.polling.longest(), c.nbd_limits.polling.max_pollers()),
            (Duration::from_micros(100), 3)
        );
        assert!(Flags::try_parse_from(["parallaxd", "--nbd-poll-us", "1001"]).is_err());
        // No pollers is polling off, like no time.
        let c = Config::from_flags(flags(&["--nbd-pollers", "0"])).unwrap();
        assert_eq!(c.nbd_limits.polling.longest(), Duration::ZERO);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.toml");
        std::fs::write(&p, "nbd_poll_us = 0\n").unwrap();
        let c = Config::from_flags(flags(&["--config", p.to_str().unwrap()])).unwrap();
        assert_eq!(c.nbd_limits.polling.longest(), Duration::ZERO);
        std::fs::write(&p, "nbd_poll_us = 5000\n").unwrap();
        let e = Config::from_flags(flags(&["--config", p.to_str().unwrap()])).unwrap_err();
        assert!(e.to_string().contains("at most 1000"), "{e}");
    }

    #[test]
    fn a_rados_store_takes_its_settings_from_flags_or_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.toml");
        std::fs::write(
            &p,
            "store = \"rados:vms/rack1\"\nceph_conf = \"/c/ceph.conf\"\nceph_id = \"parallax\"\nhost = \"h1\"\nlease = \"20s\"\n",
        )
        .unwrap();
        let c = Config::from_flags(flags(&["--config", p.to_str().unwrap()])).unwrap();
        assert_eq!(c.rados.ceph.conf, Some(PathBuf::from("/c/ceph.conf")));
        assert_eq!(c.rados.ceph.id.as_deref(), Some("parallax"));
        assert_eq!((c.rados.host.as_str(), c.rados.lease), ("h1", Duration::from_secs(20)));
        assert_eq!(c.nbd_limits.workers_per_conn, 16, "a RADOS store gets more NBD workers");
        let c = Config::from_flags(flags(&["--config", p.to_str().unwrap(), "--host", "h2", "--nbd-workers", "8"]))
            .unwrap();
        assert_eq!((c.rados.host.as_str(), c.nbd_limits.workers_per_conn), ("h2", 8));
        assert!(Config::from_flags(flags(&["--store", "rados:vms", "--lease", "2s"])).is_err(), "a 2 s lease");
        let c = Config::from_flags(flags(&["--store", "/x/s.dat"])).unwrap();
        assert_eq!(c.nbd_limits.workers_per_conn, nbd::Limits::default().workers_per_conn);
    }
}
