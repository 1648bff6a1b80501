//! The fake `qemu-system-x86_64` (tests/fakes/qemu_kvm_internal_error.rs), which behaves after the
//! name of the directory it is called from.

use std::path::{Path, PathBuf};

/// A `qemu-system-x86_64` in `dir/<behaviour>/` (a symlink to the fake, since "our QEMU" is
/// recognised by argv0). `behaviour` picks what it does:
/// - `"oom"`: it allocates memory without bound;
/// - `"runner"`: its "guest" boots at once, runs the job of its seed through the runner RPC (as the
///   test guest's runner stand-in) and powers off — no kernel, so tests can start many VMs;
///   `"runner-<N>s"`: the same, the job taking N seconds; a warm VM takes its job over the job
///   agent's port, `"runner-noack"` never acknowledges it, and `"runner-noagent"` is an image
///   without the agent (a warm VM never says READY); `"runner-linger"` reports its job after 3 s and
///   then stays up, deaf to the power button; `"runner-late"`: a warm VM acknowledges its payload
///   1.3 s after reading it and runs the job anyway (deaf to the power button), a cold VM boots in
///   2 s, jobs take 10 s;
/// - `"<behaviour>-disguised"`: the same, but it overwrites its own command line once it runs (an
///   escaped QEMU hiding: nothing in `/proc/<pid>/cmdline` names QEMU or its VM any more);
/// - `"qmp-flood"`: after QMP's greeting it streams a gigabyte without a newline;
/// - anything else (e.g. `"kvm-internal-error"`): its KVM passes the firmware probe and then fails
///   every guest with run state `internal-error`; under TCG it runs the real QEMU.
pub fn fake_qemu(dir: &Path, behaviour: &str) -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_fkr-qemu"))
        .parent()
        .unwrap()
        .join("examples/fake-qemu-kvm-internal-error");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test`/`nextest` build it; else `cargo build --examples`",
        bin.display()
    );
    let fakebin = dir.join(behaviour);
    std::fs::create_dir_all(&fakebin).unwrap();
    let link = fakebin.join("qemu-system-x86_64");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&bin, &link).unwrap();
    link
}
