//! NBD over TLS with real clients: libnbd's `nbdinfo nbds://` and qemu-io with
//! `tls-creds-x509`, client certificates required, and clients without TLS or without a
//! certificate refused.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::*;

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A test authority and, signed by it, a server certificate for 127.0.0.1 and a client
/// certificate, laid out as qemu and libnbd expect (`ca-cert.pem`, `client-cert.pem`,
/// `client-key.pem` in the client's directory). Returns (server dir, client dir, a client
/// dir with the authority only).
fn certificates(root: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "30", "-subj", "/CN=parallax test CA"]);
    ca.extend(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(root, &ca);
    for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
        let mut req = vec!["req"];
        req.extend(ec);
        let (key, csr, cert) = (format!("{name}-key.pem"), format!("{name}.csr"), format!("{name}-cert.pem"));
        let subj = format!("/CN=parallax test {name}");
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(root, &req);
        let ext = format!(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
        );
        std::fs::write(root.join(format!("{name}.ext")), ext).unwrap();
        let ext_file = format!("{name}.ext");
        openssl(
            root,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "30",
                "-extfile",
                &ext_file,
            ],
        );
    }
    let (client, bare) = (root.join("client"), root.join("bare"));
    std::fs::create_dir_all(&client).unwrap();
    std::fs::create_dir_all(&bare).unwrap();
    for (from, to) in
        [("ca-cert.pem", "ca-cert.pem"), ("client-cert.pem", "client-cert.pem"), ("client-key.pem", "client-key.pem")]
    {
        std::fs::copy(root.join(from), client.join(to)).unwrap();
    }
    std::fs::copy(root.join("ca-cert.pem"), bare.join("ca-cert.pem")).unwrap();
    (root.to_path_buf(), client, bare)
}

fn tls_flags(server: &Path, required: bool) -> Vec<String> {
    let mut f: Vec<String> =
        [("--tls-cert", "server-cert.pem"), ("--tls-key", "server-key.pem"), ("--tls-client-ca", "ca-cert.pem")]
            .iter()
            .flat_map(|(flag, file)| [flag.to_string(), server.join(file).display().to_string()])
            .collect();
    if required {
        f.push("--tls-required".into());
    }
    f
}

fn qemu_io_tls(port: u16, creds: &Path, cmds: &[&str]) -> std::process::Output {
    let object = format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", creds.display());
    let image =
        format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk,tls-creds=tls0");
    let mut args = vec!["--object", &object, "--image-opts", &image];
    for c in cmds {
        args.extend(["-c", c]);
    }
    run("qemu-io", &args)
}

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn clients_with_certificates_are_served_over_tls_and_others_are_refused() {
    need("openssl");
    need("nbdinfo");
    need("qemu-io");
    let (dir, store) = Daemon::prepare(32 * MIB);
    let certs = tempfile::tempdir().unwrap();
    let (server, client, bare) = certificates(certs.path());
    let flags = tls_flags(&server, true);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let d = Daemon::start(dir, store, &flags);

    // qemu-io with the client's certificate: writes and reads back over TLS.
    let out = qemu_io_tls(
        d.port,
        &client,
        &["write -P 0x7e 0 1M", "write -P 0x11 8M 64k", "flush", "read -P 0x7e 0 1M", "read -P 0x11 8M 64k"],
    );
    assert!(out.status.success() && !text(&out).contains("verification failed"), "{}", text(&out));

    // libnbd (GnuTLS) with the same certificates.
    let uri = format!("nbds://127.0.0.1:{}/disk?tls-certificates={}", d.port, client.display());
    let info = run_ok("nbdinfo", &["--json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&info).expect("nbdinfo JSON");
    assert_eq!(v["exports"][0]["export-size"], 32 * MIB, "{info}");
    assert_eq!(v["TLS"], true, "{info}");

    // Without a client certificate the TLS handshake is refused.
    let uri = format!("nbds://127.0.0.1:{}/disk?tls-certificates={}", d.port, bare.display());
    let out = run("nbdinfo", &[&uri]);
    assert!(!out.status.success(), "a client without a certificate was served: {}", text(&out));

    // Without TLS at all: qemu-io is refused, and by hand every option but STARTTLS gets
    // NBD_REP_ERR_TLS_REQD.
    let out = run("qemu-io", &["-f", "raw", &d.uri("disk"), "-c", "read 0 4k"]);
    assert!(!out.status.success(), "a client without TLS was served: {}", text(&out));
    let mut s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"IHAVEOPT").unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap(); // NBD_OPT_LIST
    s.write_all(&0u32.to_be_bytes()).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[12..16].try_into().unwrap()), (1 << 31) + 5, "NBD_REP_ERR_TLS_REQD");

    let log = d.log();
    assert!(log.lines().any(|l| l.contains("client entered transmission") && l.contains("tls=true")), "{log}");
    assert!(!log.lines().any(|l| l.contains("client entered transmission") && l.contains("tls=false")), "{log}");
    assert_eq!(d.stop().0, 0);
}

/// Without --tls-required, TLS is offered and clients may still connect in clear text.
#[test]
fn tls_is_optional_unless_required() {
    need("openssl");
    need("qemu-io");
    let (dir, store) = Daemon::prepare(16 * MIB);
    let certs = tempfile::tempdir().unwrap();
    let (server, client, _) = certificates(certs.path());
    let flags = tls_flags(&server, false);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let d = Daemon::start(dir, store, &flags);
    let out = qemu_io_tls(d.port, &client, &["write -P 0x21 0 64k"]);
    assert!(out.status.success(), "{}", text(&out));
    run_ok("qemu-io", &["-f", "raw", &d.uri("disk"), "-c", "read -P 0x21 0 64k"]);
    // Certificates checked only for clients that ask for TLS: the operator is told.
    let log = d.log();
    assert!(log.contains("--tls-client-ca without --tls-required"), "{log}");
    assert_eq!(d.stop().0, 0);
}

/// A TLS client that ends with `NBD_CMD_DISC`, written with Python's `ssl` module, which
/// (with `suppress_ragged_eofs=False` and OpenSSL's `OP_IGNORE_UNEXPECTED_EOF` cleared) tells
/// a session closed with TLS's `close_notify` from a cut connection.
const CLEAN_END_CLIENT: &str = r#"
import socket, ssl, struct, sys
port, creds = int(sys.argv[1]), sys.argv[2]
def recvn(sock, n):
    b = b""
    while len(b) < n:
        c = sock.recv(n - len(b))
        if not c:
            sys.exit("EOF during the handshake")
        b += c
    return b
def opt(sock, o, data=b""):
    sock.sendall(b"IHAVEOPT" + struct.pack(">II", o, len(data)) + data)
    while True:
        _, _, typ, ln = struct.unpack(">QIII", recvn(sock, 20))
        recvn(sock, ln)
        if typ == 1 or typ & (1 << 31):
            return typ
s = socket.create_connection(("127.0.0.1", port), timeout=10)
recvn(s, 18)
s.sendall(struct.pack(">I", 3))
assert opt(s, 5) == 1, "STARTTLS refused"
ctx = ssl.create_default_context(cafile=creds + "/ca-cert.pem")
ctx.load_cert_chain(creds + "/client-cert.pem", creds + "/client-key.pem")
# Debian's Python lets OpenSSL take a cut for a clean end unless told otherwise.
ctx.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
t = ctx.wrap_socket(s, server_hostname="127.0.0.1", suppress_ragged_eofs=False)
assert opt(t, 7, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0)) == 1, "GO refused"
t.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 1, 0, 0))
try:
    rest = t.recv(1)
except ssl.SSLEOFError as e:
    print("the session was cut without close_notify:", e)
    sys.exit(3)
print("clean end" if rest == b"" else "data after NBD_CMD_DISC")
sys.exit(0 if rest == b"" else 4)
"#;

/// `NBD_CMD_DISC` over TLS ends with `close_notify`: the client can tell a clean end from a
/// connection cut in the middle (a truncation attack, or a crash).
#[test]
fn a_clean_tls_disconnect_ends_with_close_notify() {
    need("openssl");
    need("python3");
    let (dir, store) = Daemon::prepare(16 * MIB);
    let certs = tempfile::tempdir().unwrap();
    let (server, client, _) = certificates(certs.path());
    let flags = tls_flags(&server, true);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let d = Daemon::start(dir, store, &flags);
    let port = d.port.to_string();
    let out = run("python3", &["-c", CLEAN_END_CLIENT, &port, &client.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(d.stop().0, 0);
}
