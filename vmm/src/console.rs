//! Feeds standard input to COM1 when standard output is the guest console.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use abide_devices::legacy::Serial;

/// Restores the terminal when dropped.
#[derive(Debug)]
pub struct Console {
    saved: Option<libc::termios>,
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some(t) = self.saved {
            // SAFETY: restores attributes previously read from the same fd.
            unsafe {
                libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &t);
            }
        }
    }
}

fn raw_mode() -> Option<libc::termios> {
    let fd = std::io::stdin().as_raw_fd();
    // SAFETY: isatty only inspects the fd.
    if unsafe { libc::isatty(fd) } != 1 {
        return None;
    }
    // SAFETY: termios is plain data; zeroed is a valid value to be filled in.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios to fill.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return None;
    }
    let saved = t;
    // Keep ISIG so Ctrl-C still stops abide; pass everything else through.
    t.c_lflag &= !(libc::ICANON | libc::ECHO);
    t.c_iflag &= !(libc::ICRNL | libc::IXON);
    // SAFETY: `t` is a valid termios derived from the current one.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
        return None;
    }
    Some(saved)
}

/// Starts a thread that copies stdin into the UART's receive FIFO, waiting
/// while the FIFO is full so no byte is lost. The thread ends at EOF.
pub fn attach_stdin(serial: Arc<Mutex<Serial>>) -> Console {
    let saved = raw_mode();
    let spawned = abide_devices::thread("stdin").spawn(move || {
        crate::seccomp::enter(crate::seccomp::ThreadKind::Console);
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 64];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut pending = &buf[..n];
            while !pending.is_empty() {
                let taken = serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .enqueue_input(pending);
                pending = &pending[taken..];
                if !pending.is_empty() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    });
    if let Err(e) = spawned {
        eprintln!("abide: warning: guest console input disabled: {e}");
    }
    Console { saved }
}
