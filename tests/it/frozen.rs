//! A frozen disk (`fsfreeze` on a small loop-mounted ext4): writes block in
//! the kernel for as long as it stays frozen. Stop must still kill the
//! agent, cancel must still answer, and SIGTERM must still drain within a
//! bounded time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{Frame, Server, alive, eventually};

/// An ext4 filesystem in a file, mounted on `<dir>/data`; unfrozen and
/// unmounted on drop, whatever the test did.
struct LoopDisk {
    mount: PathBuf,
    image: PathBuf,
}

impl LoopDisk {
    fn new(dir: &Path) -> LoopDisk {
        let image = dir.join("disk.img");
        let mount = dir.join("data");
        std::fs::create_dir_all(&mount).unwrap();
        std::fs::File::create(&image).unwrap().set_len(64 << 20).unwrap();
        run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        run("mount", &["-o", "loop", image.to_str().unwrap(), mount.to_str().unwrap()]);
        LoopDisk { mount, image }
    }

    fn freeze(&self) {
        run("fsfreeze", &["-f", self.mount.to_str().unwrap()]);
    }

    fn thaw(&self) {
        thaw(&self.mount);
    }

    /// Thaws on drop: declared after the server, it runs before the
    /// server's own drop, which reaps a process that cannot exit while the
    /// disk is frozen.
    fn thaw_guard(&self) -> Thaw {
        Thaw(self.mount.clone())
    }
}

fn thaw(mount: &Path) {
    let _ = Command::new("fsfreeze").arg("-u").arg(mount).output();
}

struct Thaw(PathBuf);

impl Drop for Thaw {
    fn drop(&mut self) {
        thaw(&self.0);
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        self.thaw();
        let _ = Command::new("umount").arg("-l").arg(&self.mount).output();
        let _ = std::fs::remove_file(&self.image);
    }
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// Reads the stream until the agent says `text`.
async fn until_text(stream: &mut crate::harness::Attached, text: &str) {
    loop {
        if let Some(Frame::Event { data, .. }) = stream.next().await
            && data["text"] == text
        {
            return;
        }
    }
}

/// Regression: while a write waited on a stalled disk, the turn did not see
/// Stop, and cancel waited for ever for the turn's end to be logged; the
/// drain had no bound either.
#[tokio::test]
async fn a_frozen_disk_does_not_stop_stop_or_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let disk = LoopDisk::new(dir.path());
    let mut server = Server::options().start_in(dir);
    let _thaw = disk.thaw_guard();
    let (session, mut stream) = server.attached().await;
    // More events than a turn keeps in flight, once the disk is frozen.
    server.start_turn(&session, "ignore-term\nsay frozen soon\nsleep 1\nflood 2000 100\nsleep 600").await;
    until_text(&mut stream, "frozen soon").await;
    disk.freeze();
    eventually("the agent to be recorded", || !server.agent_runs().is_empty()).await;
    let agent = server.agent_runs()[0]["pid"].as_u64().unwrap() as u32;

    let cancelled = tokio::time::timeout(Duration::from_secs(25), server.cancel(&session)).await;
    assert_eq!(cancelled.expect("cancel answered while the disk is frozen")["cancelled"], true);
    assert!(!alive(agent), "the agent is dead when cancel answers");

    let signalled = Instant::now();
    server.send_sigterm();
    let drained = loop {
        if server.log().contains("drained; bye") {
            break signalled.elapsed();
        }
        assert!(signalled.elapsed() < Duration::from_secs(45), "no drain within 45 s: {}", server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A thread blocked in the kernel on the frozen disk holds the exit
    // itself until the disk thaws; nothing in the server waits any longer.
    disk.thaw();
    let status = server.wait(Duration::from_secs(30)).expect("exits once the disk thaws");
    assert!(status.success(), "exit status {status:?}");
    eprintln!("drained {drained:?} after SIGTERM with the disk frozen");
}
