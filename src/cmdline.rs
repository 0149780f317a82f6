//! `key=value` words of a boot command line.

/// The value of the first `key=value` word, if any.
pub fn get<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}
