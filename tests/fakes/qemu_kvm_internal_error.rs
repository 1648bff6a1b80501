//! A stand-in for `qemu-system-x86_64` on a host whose KVM passes the firmware probe but then fails
//! a real guest, as measured on some machines of ours: with `-accel kvm` it behaves like QEMU after
//! "KVM internal error. Suberror: 1 … emulation failure" — it prints the firmware's first line on
//! the serial console (so the accelerator probe passes), and after [`FAIL_AFTER`] pauses the vCPUs
//! in run state `internal-error` (QMP `STOP` event, `query-status` says so, the error on stderr) and
//! stays alive until told to `quit`, like the real one. With any other accelerator it `exec`s the
//! real `qemu-system-x86_64` from `PATH` with the same arguments, so the TCG retry boots for real.
//!
//! Called through a symlink in a directory named `oom`, it is instead a QEMU that allocates memory
//! without bound (for the VM cgroup's memory limit); in a directory named `runner`, a QEMU whose
//! "guest" runs its job at once through the runner RPC and powers off (`guest_runner.rs`; a warm
//! VM takes its job over the job agent's port, and in `runner-noack` never acknowledges it).
//!
//! In a directory named `qmp-flood`, it streams a gigabyte without a newline to every QMP client.
//!
//! Tests call it through a symlink named `qemu-system-x86_64` (the driver's rule for "our QEMU"
//! looks at argv0). It reads only its arguments and inherited descriptors, as QEMU does under the
//! driver's sandbox (empty environment, QMP and the serial console as listening sockets `fd=N`).
//! Like QEMU's socket chardevs, both accept a new client once the previous one left (a restarted
//! daemon takes the VM over), and serial bytes written while no client is connected are dropped.

#[path = "guest_runner.rs"]
mod guest_runner;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const FAIL_AFTER: Duration = Duration::from_millis(1500);

/// `key=value` of a QEMU option string, with `,,` meaning a literal comma.
fn opt(value: &str, key: &str) -> Option<String> {
    let unescaped = value.replace(",,", "\u{0}");
    unescaped
        .split(',')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .map(|v| v.replace('\u{0}', ","))
}

fn real_qemu() -> PathBuf {
    let me = std::env::current_exe().and_then(|p| p.canonicalize()).ok();
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|c| c.is_file() && c.canonicalize().ok() != me)
        .expect("a real qemu-system-x86_64")
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

struct Vm {
    status: &'static str,
    clients: Vec<UnixStream>,
}

fn send(stream: &mut UnixStream, v: serde_json::Value) {
    let _ = writeln!(stream, "{v}");
}

fn timestamp() -> serde_json::Value {
    let ms = now_ms();
    serde_json::json!({"seconds": (ms / 1000) as u64, "microseconds": ((ms % 1000) * 1000) as u64})
}

fn serve_client(mut stream: UnixStream, vm: Arc<Mutex<Vm>>) {
    send(
        &mut stream,
        serde_json::json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
            "package": "fake-kvm-internal-error"}, "capabilities": []}}),
    );
    if let Ok(c) = stream.try_clone() {
        vm.lock().unwrap().clients.push(c);
    }
    let reader = BufReader::new(stream.try_clone().expect("clone"));
    for line in reader.lines() {
        let Ok(line) = line else { return };
        let Ok(req) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let id = req.get("id").cloned().unwrap_or(serde_json::Value::Null);
        let cmd = req.get("execute").and_then(|v| v.as_str()).unwrap_or("");
        let status = vm.lock().unwrap().status;
        match cmd {
            "qmp_capabilities" | "system_powerdown" | "cont" => {
                // A paused vCPU hears no power button: accepted, nothing happens.
                send(&mut stream, serde_json::json!({"return": {}, "id": id}))
            }
            "query-status" => send(
                &mut stream,
                serde_json::json!({"return": {"status": status, "running": status == "running",
                    "singlestep": false}, "id": id}),
            ),
            "quit" => {
                send(&mut stream, serde_json::json!({"return": {}, "id": id}));
                send(
                    &mut stream,
                    serde_json::json!({"event": "SHUTDOWN", "data": {"guest": false,
                        "reason": "host-qmp-quit"}, "timestamp": timestamp()}),
                );
                std::process::exit(0);
            }
            other => send(
                &mut stream,
                serde_json::json!({"error": {"class": "CommandNotFound",
                    "desc": format!("The command {other} has not been found")}, "id": id}),
            ),
        }
    }
}

/// Called as `…/oom/qemu-system-x86_64`: a QEMU that allocates and touches memory until something
/// stops it (its cgroup's OOM killer), 16 MiB at a time, up to 4 GiB.
fn allocate_forever() -> ! {
    let mut hog: Vec<Vec<u8>> = Vec::new();
    for _ in 0..256 {
        hog.push(vec![0x5a; 16 << 20]);
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("fake qemu: allocated 4 GiB and was not stopped");
    std::process::exit(3);
}

/// A socket chardev's listener: the socket the caller bound and passed as `fd=N` (or a path to bind).
fn socket_listener(chardev: &str) -> UnixListener {
    match opt(chardev, "fd") {
        Some(fd) => {
            let fd: i32 = fd.parse().expect("a descriptor number");
            // SAFETY: the caller passed this descriptor for QMP; nothing else in this process owns it.
            UnixListener::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
        }
        None => UnixListener::bind(Path::new(&opt(chardev, "path").expect("path="))).expect("bind"),
    }
}

/// QMP: the socket chardev that is neither the serial console nor the job agent's port.
fn qmp_listener(chardevs: &[String]) -> UnixListener {
    let qmp = chardevs
        .iter()
        .find(|c| {
            c.starts_with("socket,")
                && !matches!(opt(c, "id").as_deref(), Some("serial0" | "agent0"))
        })
        .expect("a socket chardev for QMP");
    socket_listener(qmp)
}

/// Where the serial console goes: QEMU's chardev `serial0`.
enum Serial {
    /// A socket: the connected client, if any.
    Socket(Arc<Mutex<Option<UnixStream>>>),
    Out(Mutex<Box<dyn Write + Send>>),
}

static SERIAL: OnceLock<Serial> = OnceLock::new();

/// Opens the serial console named by `-chardev …,id=serial0`: a socket (with `wait=on`, the first
/// client is accepted before the "guest" runs, as QEMU does), a file, or stdout.
fn serial_init(chardevs: &[String]) {
    let dev = chardevs
        .iter()
        .find(|c| opt(c, "id").as_deref() == Some("serial0"));
    let serial = match dev {
        Some(c) if c.starts_with("socket,") => {
            let listener = socket_listener(c);
            let current = Arc::new(Mutex::new(None));
            if opt(c, "wait").as_deref() == Some("on") {
                let (first, _) = listener.accept().expect("accept the serial client");
                *current.lock().unwrap() = Some(first);
            }
            let slot = current.clone();
            std::thread::spawn(move || {
                for s in listener.incoming().flatten() {
                    *slot.lock().unwrap() = Some(s);
                }
            });
            Serial::Socket(current)
        }
        Some(c) if c.starts_with("file,") => Serial::Out(Mutex::new(Box::new(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(opt(c, "path").expect("path="))
                .expect("open the serial log"),
        ))),
        _ => Serial::Out(Mutex::new(Box::new(std::io::stdout()))),
    };
    let _ = SERIAL.set(serial);
}

/// Writes to the serial console; dropped when no client is connected (or it left).
fn serial_write(bytes: &[u8]) {
    match SERIAL.get() {
        Some(Serial::Socket(current)) => {
            let mut c = current.lock().unwrap();
            if let Some(s) = c.as_mut() {
                if s.write_all(bytes).is_err() {
                    *c = None;
                }
            }
        }
        Some(Serial::Out(out)) => {
            let mut out = out.lock().unwrap();
            let _ = out.write_all(bytes).and_then(|()| out.flush());
        }
        None => {}
    }
}

/// What an escaped QEMU can do to hide: overwrite its own command line (`/proc/self/cmdline` reads
/// the memory between `arg_start` and `arg_end`), so nothing of it names QEMU or its VM any more.
fn disguise() {
    use std::io::{Seek, SeekFrom};
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name's closing parenthesis; arg_start and arg_end are fields 48
    // and 49 of the whole line, so 46 and 47 counted from field 3.
    let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let start: u64 = rest[45].parse().unwrap();
    let end: u64 = rest[46].parse().unwrap();
    let mut area = vec![0u8; (end - start) as usize];
    let name = b"kworker/0:1";
    area[..name.len()].copy_from_slice(name);
    let mut mem = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/mem")
        .expect("/proc/self/mem");
    mem.seek(SeekFrom::Start(start)).unwrap();
    mem.write_all(&area).expect("rewriting the command line");
}

/// An escaped QEMU attacking the daemon through QMP: it greets, answers `qmp_capabilities`, then
/// streams up to a gigabyte without a newline to every client.
fn flood_qmp(listener: UnixListener) -> ! {
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut stream = stream;
            send(
                &mut stream,
                serde_json::json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                    "package": "fake-qmp-flood"}, "capabilities": []}}),
            );
            let mut line = String::new();
            let Ok(reader) = stream.try_clone() else {
                return;
            };
            if BufReader::new(reader).read_line(&mut line).is_err() {
                return;
            }
            let id = serde_json::from_str::<serde_json::Value>(&line)
                .map(|v| v["id"].clone())
                .unwrap_or_default();
            send(&mut stream, serde_json::json!({"return": {}, "id": id}));
            let chunk = vec![b'a'; 1 << 20];
            for _ in 0..1024 {
                if stream.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
    }
    std::process::exit(0);
}

fn main() {
    let me = std::env::args().next().unwrap_or_default();
    let mut behaviour = Path::new(&me).parent().and_then(Path::file_name);
    // `<behaviour>-disguised`: the same, with its command line rewritten once it runs.
    let plain = behaviour
        .and_then(|b| b.to_str())
        .and_then(|b| b.strip_suffix("-disguised"))
        .map(str::to_owned);
    if let Some(plain) = &plain {
        behaviour = Some(plain.as_ref());
    }
    if behaviour == Some("oom".as_ref()) {
        allocate_forever();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value_of = |flag: &str| {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect::<Vec<_>>()
    };
    let chardevs = value_of("-chardev");
    if plain.is_some() {
        disguise();
    }
    let accel = value_of("-accel").into_iter().next().unwrap_or_default();
    if behaviour == Some("qmp-flood".as_ref()) {
        flood_qmp(qmp_listener(&chardevs));
    }
    let runner_mode = behaviour
        .and_then(|b| b.to_str())
        .is_some_and(|b| b.starts_with("runner"));
    if runner_mode || accel == "kvm" {
        serial_init(&chardevs);
    }
    // `runner`, or `runner-<N>s` for jobs that take N seconds; `runner-noack`: a warm VM that
    // never acknowledges its payload; `runner-noagent`: an image without the job agent;
    // `runner-linger`: a guest that stays up after its job, deaf to the power button.
    // `runner-late`: a warm VM that acknowledges its payload just too late and runs it anyway.
    if behaviour.and_then(|b| b.to_str()) == Some("runner-linger") {
        guest_runner::LINGER.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    if behaviour.and_then(|b| b.to_str()) == Some("runner-late") {
        guest_runner::LATE.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    if let Some((work, agent)) = behaviour
        .and_then(|b| b.to_str())
        .and_then(|b| b.strip_prefix("runner"))
        .and_then(|rest| match rest {
            "" => Some((0, guest_runner::Agent::Acks)),
            "-noack" => Some((0, guest_runner::Agent::NoAck)),
            "-noagent" => Some((0, guest_runner::Agent::Absent)),
            "-linger" => Some((3, guest_runner::Agent::Acks)),
            "-late" => Some((10, guest_runner::Agent::Acks)),
            secs => Some((
                secs.strip_prefix('-')?.strip_suffix('s')?.parse().ok()?,
                guest_runner::Agent::Acks,
            )),
        })
    {
        guest_runner::run(
            &args,
            qmp_listener(&chardevs),
            std::time::Duration::from_secs(work),
            agent,
        );
    }
    if accel != "kvm" {
        let err = std::process::Command::new(real_qemu()).args(&args).exec();
        eprintln!("fake qemu: exec failed: {err}");
        std::process::exit(1);
    }
    let listener = qmp_listener(&chardevs);
    // OVMF's first words, as the probe wants to see them.
    serial_write(b"BdsDxe: fake firmware running under kvm\r\n");
    let vm = Arc::new(Mutex::new(Vm {
        status: "running",
        clients: Vec::new(),
    }));
    let failing = vm.clone();
    std::thread::spawn(move || {
        std::thread::sleep(FAIL_AFTER);
        let mut vm = failing.lock().unwrap();
        vm.status = "internal-error";
        // The moment, for tests that time how fast the driver notices.
        eprintln!("KVM internal error. Suberror: 1");
        eprintln!(
            "emulation failure (fake qemu: internal-error at unix_ms={})",
            now_ms()
        );
        let event = serde_json::json!({"event": "STOP", "timestamp": timestamp()});
        for c in &mut vm.clients {
            send(c, event.clone());
        }
    });
    for stream in listener.incoming().flatten() {
        let vm = vm.clone();
        std::thread::spawn(move || serve_client(stream, vm));
    }
}
