//! The fake QEMU called from a directory named `runner`: a guest that "boots" at once and does what
//! the test guest's cloud-init and runner stand-in do, without a kernel: it reads the NoCloud seed
//! QEMU was given (the FAT image in fdset 5), takes the runner's URL, uuid, token and job handle from
//! its user-data, speaks the runner's Connect RPC (`Declare`, `FetchSingleTask` for that handle,
//! `UpdateLog`, `UpdateTask` with success), then powers the "guest" off: QMP `SHUTDOWN` with reason
//! `guest-shutdown`, exit 0. For tests that start many VMs (the multi-host race) where booting real
//! guests would take too long. What it did goes to its serial console, `fake-guest: …`.
//!
//! A warm VM (argv has the job agent's `-chardev socket,id=agent0,fd=N`) takes its job over the
//! agent's line protocol instead (`src/vm/agent.rs`): READY, the payload's runner token file and
//! command, STARTED. Called from `runner-noack`, it reads the payload and never says STARTED; from
//! `runner-noagent`, it is an image without the agent: a warm VM idles, never saying READY. From
//! `runner-linger` ([`LINGER`]) it is a hostile guest: it reports its job (after 3 s of work), then
//! neither powers off nor answers the power button (only `quit` or a kill ends it).

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

/// How long the "job" holds its VM after reporting, so that VM slots stay busy for a moment.
const HOLD: Duration = Duration::from_millis(300);
/// How often a fetch that got no task (or failed) is repeated before the guest gives up.
const FETCH_TRIES: u32 = 5;

/// `runner-late`: a warm VM acknowledges its payload [`LATE_ACK`] after reading it (just past the
/// host's 1 s `bind_timeout` in the test) and then runs the job with the payload's runner, deaf
/// to the power button (only `quit` ends it); a cold VM takes [`LATE_COLD_BOOT`] to boot. Jobs
/// take 10 s.
pub static LATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
const LATE_ACK: Duration = Duration::from_millis(1300);
const LATE_COLD_BOOT: Duration = Duration::from_secs(2);

fn late() -> bool {
    LATE.load(std::sync::atomic::Ordering::SeqCst)
}

/// The guest keeps running after its job and ignores the power button (`runner-linger`).
pub static LINGER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn lingers() -> bool {
    LINGER.load(std::sync::atomic::Ordering::SeqCst)
}

/// What the seed's user-data tells the runner.
struct RunnerArgs {
    url: String,
    uuid: String,
    token: String,
    label: String,
    handle: String,
}

fn say(what: &str) {
    super::serial_write(format!("fake-guest: {what}\n").as_bytes());
}

/// The seed image's bytes: `-add-fd fd=N,set=5,…` names the descriptor.
fn seed_bytes(args: &[String]) -> Vec<u8> {
    let fd: i32 = args
        .windows(2)
        .filter(|w| w[0] == "-add-fd")
        .find_map(|w| {
            let opts: Vec<&str> = w[1].split(',').collect();
            opts.contains(&"set=5")
                .then(|| opts.iter().find_map(|o| o.strip_prefix("fd=")))
                .flatten()
                .and_then(|fd| fd.parse().ok())
        })
        .expect("the seed's descriptor (-add-fd …,set=5)");
    // SAFETY: the caller passed this descriptor for the seed; nothing else in this process owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let len = file.metadata().expect("stat the seed").len() as usize;
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, 0).expect("read the seed");
    buf
}

fn user_data(seed: Vec<u8>) -> String {
    let fs = fatfs::FileSystem::new(std::io::Cursor::new(seed), fatfs::FsOptions::new())
        .expect("the seed is a FAT image");
    let mut text = String::new();
    fs.root_dir()
        .open_file("user-data")
        .expect("the seed has user-data")
        .read_to_string(&mut text)
        .expect("read user-data");
    text
}

/// The shell word after `flag ` in `cmd`: `'…'` (sh-quoted) or up to the next blank.
fn word_after(cmd: &str, flag: &str) -> String {
    let rest = cmd
        .split_once(&format!("{flag} "))
        .unwrap_or_else(|| panic!("{flag} in the runner's command line"))
        .1;
    match rest.strip_prefix('\'') {
        Some(q) => q.split('\'').next().unwrap_or_default().to_owned(),
        None => rest
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned(),
    }
}

/// The "Seed contract" subset that matters here: the runner token file's content and the
/// `forgejo-runner one-job` command line of `runcmd`.
fn runner_args(user_data: &str) -> RunnerArgs {
    let lines: Vec<&str> = user_data.lines().collect();
    let at = lines
        .iter()
        .position(|l| *l == "- path: /etc/fkr/runner-token")
        .expect("the runner token in write_files");
    let token_b64 = lines[at + 1..]
        .iter()
        .find_map(|l| l.strip_prefix("  content: "))
        .expect("the token's content");
    let token = base64::engine::general_purpose::STANDARD
        .decode(token_b64)
        .expect("base64 content");
    // runcmd lines are YAML single-quoted: `''` is one quote.
    let cmd = lines
        .iter()
        .find(|l| l.starts_with("- '") && l.contains("forgejo-runner one-job"))
        .expect("the runner's command in runcmd")
        .replace("''", "'");
    let label = word_after(&cmd, "--label");
    RunnerArgs {
        url: word_after(&cmd, "--url"),
        uuid: word_after(&cmd, "--uuid"),
        token: String::from_utf8(token).expect("a UTF-8 token"),
        // `external-host:host` declares the name only, as forgejo-runner does.
        label: label.split(':').next().unwrap_or_default().to_owned(),
        handle: word_after(&cmd, "--handle"),
    }
}

/// One Connect RPC call; the answer's JSON, or why it failed.
async fn rpc(
    client: &reqwest::Client,
    r: &RunnerArgs,
    method: &str,
    body: Value,
) -> Result<Value, String> {
    let url = format!(
        "{}/api/actions/runner.v1.RunnerService/{method}",
        r.url.trim_end_matches('/')
    );
    let resp = client
        .post(&url)
        .header("content-type", "application/json")
        .header("x-runner-uuid", &r.uuid)
        .header("x-runner-token", &r.token)
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| format!("{method}: {e}"))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| format!("{method}: {e}"))?;
    if !status.is_success() {
        return Err(format!("{method}: HTTP {status}: {text}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("{method}: {e}: {text}"))
}

/// Runs the job as the runner stand-in does; returns what happened, for the console.
/// `uplink`: the unix socket every connection goes through (see [`uplink`]).
async fn run_job(
    r: &RunnerArgs,
    work: Duration,
    uplink: Option<std::path::PathBuf>,
) -> Result<String, String> {
    let mut client = reqwest::Client::builder().timeout(Duration::from_secs(20));
    if let Some(path) = uplink {
        client = client.unix_socket(path);
    }
    let client = client.build().map_err(|e| e.to_string())?;
    rpc(
        &client,
        r,
        "Declare",
        json!({"version": "fkr-fake-guest", "labels": [r.label]}),
    )
    .await?;
    say(&format!("declared {} as runner {}", r.label, r.uuid));
    let mut task = None;
    for _ in 0..FETCH_TRIES {
        match rpc(
            &client,
            r,
            "FetchSingleTask",
            json!({"tasksVersion": "0", "handle": r.handle}),
        )
        .await
        {
            Ok(v) => {
                task = v["task"]["id"]
                    .as_str()
                    .map(str::to_owned)
                    .or_else(|| v["task"]["id"].as_i64().map(|i| i.to_string()));
                if task.is_some() {
                    break;
                }
                say(&format!("no task for handle {}", r.handle));
            }
            Err(e) => say(&e),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let Some(task) = task else {
        return Ok(format!("gave up: no task for handle {}", r.handle));
    };
    say(&format!("got task {task} for handle {}", r.handle));
    // The job's own work (benchmarks give jobs a duration; tests use none).
    tokio::time::sleep(work).await;
    rpc(
        &client,
        r,
        "UpdateLog",
        json!({"taskId": task, "index": "0", "rows": [{"content": "fake guest ran it"}], "noMore": true}),
    )
    .await?;
    rpc(
        &client,
        r,
        "UpdateTask",
        json!({"state": {"id": task, "result": "RESULT_SUCCESS"}}),
    )
    .await?;
    Ok(format!("task {task} finished: success"))
}

/// QMP as far as the driver uses it with a running guest; `ready` turns true once a client asked
/// for the run state (the driver is then watching for the guest's events).
fn serve_qmp(
    listener: std::os::unix::net::UnixListener,
    clients: Arc<Mutex<Vec<std::os::unix::net::UnixStream>>>,
    ready: Arc<(Mutex<bool>, Condvar)>,
) {
    for stream in listener.incoming().flatten() {
        let (clients, ready) = (clients.clone(), ready.clone());
        std::thread::spawn(move || {
            let mut out = stream.try_clone().expect("clone the QMP stream");
            super::send(
                &mut out,
                json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                    "package": "fake-guest-runner"}, "capabilities": []}}),
            );
            clients
                .lock()
                .unwrap()
                .push(stream.try_clone().expect("clone"));
            let reader = std::io::BufReader::new(stream);
            for line in std::io::BufRead::lines(reader) {
                let Ok(line) = line else { return };
                let Ok(req) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let id = req.get("id").cloned().unwrap_or(Value::Null);
                match req["execute"].as_str().unwrap_or("") {
                    "qmp_capabilities" | "block-set-write-threshold" | "cont" => {
                        super::send(&mut out, json!({"return": {}, "id": id}))
                    }
                    "query-status" => {
                        super::send(
                            &mut out,
                            json!({"return": {"status": "running", "running": true,
                                "singlestep": false}, "id": id}),
                        );
                        let (flag, cv) = &*ready;
                        *flag.lock().unwrap() = true;
                        cv.notify_all();
                    }
                    // The power button, or being told to quit: the guest goes down at once.
                    "system_powerdown" => {
                        super::send(&mut out, json!({"return": {}, "id": id}));
                        if lingers() || late() {
                            say("power button pressed; ignoring it");
                        } else {
                            power_off(&clients, true);
                        }
                    }
                    "quit" => {
                        super::send(&mut out, json!({"return": {}, "id": id}));
                        power_off(&clients, false);
                    }
                    other => super::send(
                        &mut out,
                        json!({"error": {"class": "CommandNotFound",
                            "desc": format!("The command {other} has not been found")}, "id": id}),
                    ),
                }
            }
        });
    }
}

/// Tells every QMP client of the shutdown (by the guest, or `quit`) and exits.
fn power_off(clients: &Mutex<Vec<std::os::unix::net::UnixStream>>, guest: bool) -> ! {
    let reason = if guest {
        "guest-shutdown"
    } else {
        "host-qmp-quit"
    };
    let event = json!({"event": "SHUTDOWN", "data": {"guest": guest, "reason": reason},
        "timestamp": super::timestamp()});
    for c in clients.lock().unwrap().iter_mut() {
        super::send(c, event.clone());
    }
    std::process::exit(0);
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

/// The job agent's listening socket, for a warm VM.
fn agent_listener(args: &[String]) -> Option<std::os::unix::net::UnixListener> {
    let chardev = args
        .windows(2)
        .find(|w| w[0] == "-chardev" && w[1].starts_with("socket,id=agent0,"))?;
    let fd: i32 = super::opt(&chardev[1], "fd")?.parse().ok()?;
    // SAFETY: the caller passed this descriptor for the agent port; nothing else owns it.
    Some(unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) })
}

/// What the "guest" does with the job agent's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agent {
    /// READY, the payload, STARTED.
    Acks,
    /// READY, the payload, then silence.
    NoAck,
    /// No agent in the "image": a warm VM idles and never says READY (cold VMs run as usual).
    Absent,
}

/// A warm VM's side of the agent protocol: READY, then the payload; STARTED unless `ack` is off.
fn take_job_over_agent(listener: std::os::unix::net::UnixListener, ack: bool) -> RunnerArgs {
    use std::io::BufRead;
    let (mut stream, _) = listener
        .accept()
        .expect("the host connects to the agent port");
    writeln!(stream, "READY {}", unix_ms()).expect("READY");
    say("agent: ready");
    let b64 = |v: &str| {
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(v)
                .expect("base64 in the payload"),
        )
        .expect("UTF-8 in the payload")
    };
    let (mut token, mut command) = (None, None);
    let reader = std::io::BufReader::new(stream.try_clone().expect("clone"));
    for line in reader.lines() {
        let line = line.expect("a payload line");
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["FILE", "/etc/fkr/runner-token", _, content] => token = Some(b64(content)),
            ["FILE", ..] => {}
            ["RUN", cmd] => command = Some(b64(cmd)),
            ["END"] => break,
            _ => panic!("unexpected payload line {line:?}"),
        }
    }
    if !ack {
        say("agent: got the payload; never acknowledging it");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    if late() {
        std::thread::sleep(LATE_ACK);
        say("agent: acknowledging late");
        // The host may have given up and closed the port: the runner starts anyway.
        let _ = writeln!(stream, "STARTED {}", unix_ms());
    } else {
        writeln!(stream, "STARTED {}", unix_ms()).expect("STARTED");
    }
    let cmd = command.expect("RUN in the payload");
    let cmd = cmd
        .lines()
        .find(|l| l.contains("forgejo-runner one-job"))
        .expect("the runner's command")
        .to_owned();
    let label = word_after(&cmd, "--label");
    RunnerArgs {
        url: word_after(&cmd, "--url"),
        uuid: word_after(&cmd, "--uuid"),
        token: token.expect("the runner token in the payload"),
        label: label.split(':').next().unwrap_or_default().to_owned(),
        handle: word_after(&cmd, "--handle"),
    }
}

/// The way to Forgejo: this process is QEMU's, in the sandbox's network namespace, where only
/// loopback exists (a real guest has its tap); a test that runs this fake puts a unix socket that
/// leads to Forgejo beside the fake's argv0 (`tests/common/fleet.rs`, `Uplink`).
fn uplink() -> Option<std::path::PathBuf> {
    let sock = std::path::PathBuf::from(std::env::args().next()?).with_file_name("uplink.sock");
    sock.exists().then_some(sock)
}

/// Runs the "guest" to its power-off.
/// `work`: how long the job itself takes once the runner has its task; `ack`: whether a warm
/// VM acknowledges its payload.
pub fn run(
    args: &[String],
    listener: std::os::unix::net::UnixListener,
    work: Duration,
    agent: Agent,
) -> ! {
    let clients = Arc::new(Mutex::new(Vec::new()));
    let ready = Arc::new((Mutex::new(false), Condvar::new()));
    {
        let (clients, ready) = (clients.clone(), ready.clone());
        std::thread::spawn(move || serve_qmp(listener, clients, ready));
    }
    let runner = match agent_listener(args) {
        Some(_) if agent == Agent::Absent => {
            say("booted; no job agent in this image: idling");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Some(port) => take_job_over_agent(port, agent == Agent::Acks),
        None => {
            if late() {
                std::thread::sleep(LATE_COLD_BOOT);
            }
            runner_args(&user_data(seed_bytes(args)))
        }
    };
    say(&format!(
        "booted; the runner takes job handle {}",
        runner.handle
    ));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    match rt.block_on(run_job(&runner, work, uplink())) {
        Ok(done) => say(&done),
        Err(e) => say(&format!("error: {e}")),
    }
    std::thread::sleep(HOLD);
    if lingers() {
        say("job reported; staying up");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    // Power off only once the driver watches (its SHUTDOWN event must not go to nobody).
    let (flag, cv) = &*ready;
    let guard = flag.lock().unwrap();
    let _ = cv
        .wait_timeout_while(guard, Duration::from_secs(60), |ready| !*ready)
        .unwrap();
    say("powering off");
    power_off(&clients, true);
}
