//! A short fixed-capacity message (why a save failed, why a restore was
//! refused), since ksave keeps its heap for other things.

use core::fmt;

/// Up to [`Message::CAPACITY`] bytes of UTF-8; longer text is cut.
#[derive(Clone)]
pub struct Message {
    buf: [u8; Message::CAPACITY],
    len: usize,
}

impl Message {
    /// The most bytes a message holds.
    pub const CAPACITY: usize = 240;

    /// Formats `args` into a message.
    pub fn format(args: fmt::Arguments) -> Self {
        let mut m = Self { buf: [0; Self::CAPACITY], len: 0 };
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

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Message {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::String;

    #[test]
    fn long_text_is_cut_at_a_whole_character() {
        let long: String = core::iter::repeat_n('é', 200).collect();
        let m = Message::format(format_args!("{long}"));
        assert_eq!(m.as_str().len(), Message::CAPACITY);
        assert!(m.as_str().chars().all(|c| c == 'é'));
        let m = Message::format(format_args!("x{long}"));
        assert_eq!(m.as_str().len(), Message::CAPACITY - 1);
    }
}
