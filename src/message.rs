//! A short fixed-capacity message (why a save failed, why a restore was
//! refused), since ksave keeps its heap for other things.

use core::fmt;

/// Up to 240 bytes of UTF-8; longer text is cut.
#[derive(Clone)]
pub struct Message {
    buf: [u8; 240],
    len: usize,
}

impl Message {
    /// Formats `args` into a message.
    pub fn format(args: fmt::Arguments) -> Self {
        let mut m = Self { buf: [0; 240], len: 0 };
        let _ = fmt::write(&mut m, args);
        m
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        match core::str::from_utf8(&self.buf[..self.len]) {
            Ok(s) => s,
            // Cut inside a character: keep the whole ones.
            Err(e) => core::str::from_utf8(&self.buf[..e.valid_up_to()]).unwrap_or(""),
        }
    }
}

impl fmt::Write for Message {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}
