//! Page codecs: how a group of stored pages becomes a chunk's payload, and
//! back. The writer asks its codec to encode each group; the reader picks
//! the codec a chunk's [`Encoding`] names. Raw is the one codec whose
//! payload *is* the pages ([`PageCodec::zero_copy`]): the writer and the
//! restore move those by DMA straight from and to where the pages lie, and
//! never call it. A codec that transforms bytes (LZ4 now, an encrypting one
//! next) goes through the writer's and reader's buffers.

use crate::PAGE;
use crate::chunk::Encoding;

/// One way of storing pages in a chunk's payload.
pub trait PageCodec {
    /// The encoding its chunks carry.
    fn encoding(&self) -> Encoding;

    /// Whether the payload is the pages themselves, so that they can go
    /// between memory and disk by DMA without a copy.
    fn zero_copy(&self) -> bool {
        false
    }

    /// Encodes `pages` (whole pages) into `out`; returns the payload's
    /// length, or `None` when storing them this way does not pay (they are
    /// then stored raw).
    fn encode(&mut self, pages: &[u8], out: &mut [u8]) -> Option<usize>;

    /// Decodes `payload` into exactly `pages` (whole pages), or says why
    /// it cannot.
    fn decode(&mut self, payload: &[u8], pages: &mut [u8]) -> Result<(), &'static str>;
}

/// The pages as they are.
pub struct Raw;

impl PageCodec for Raw {
    fn encoding(&self) -> Encoding {
        Encoding::Raw
    }

    fn zero_copy(&self) -> bool {
        true
    }

    fn encode(&mut self, pages: &[u8], out: &mut [u8]) -> Option<usize> {
        out.get_mut(..pages.len())?.copy_from_slice(pages);
        Some(pages.len())
    }

    fn decode(&mut self, payload: &[u8], pages: &mut [u8]) -> Result<(), &'static str> {
        if payload.len() != pages.len() {
            return Err("payload length");
        }
        pages.copy_from_slice(payload);
        Ok(())
    }
}

/// LZ4 block format (lz4_flex), worth it only when it saves a sixteenth.
pub struct Lz4;

impl PageCodec for Lz4 {
    fn encoding(&self) -> Encoding {
        Encoding::Lz4
    }

    fn encode(&mut self, pages: &[u8], out: &mut [u8]) -> Option<usize> {
        let len = lz4_flex::block::compress_into(pages, out).ok()?;
        (crate::chunk::LZ4_HEADER + len <= pages.len() * 15 / 16).then_some(len)
    }

    fn decode(&mut self, payload: &[u8], pages: &mut [u8]) -> Result<(), &'static str> {
        match lz4_flex::block::decompress_into(payload, pages) {
            Ok(n) if n == pages.len() && n.is_multiple_of(PAGE) => Ok(()),
            _ => Err("LZ4 payload does not decompress to its pages"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_codec_round_trips_or_declines() {
        let mut pages = [0u8; 2 * PAGE];
        pages.iter_mut().enumerate().for_each(|(i, b)| *b = (i % 7) as u8);
        let mut out = [0u8; 3 * PAGE];
        let mut back = [0u8; 2 * PAGE];
        let codecs: [&mut dyn PageCodec; 2] = [&mut Raw, &mut Lz4];
        for codec in codecs {
            let len = codec.encode(&pages, &mut out).unwrap();
            codec.decode(&out[..len], &mut back).unwrap();
            assert_eq!(back, pages, "{:?}", codec.encoding());
            assert!(codec.decode(&out[..len - 1], &mut back).is_err(), "{:?}", codec.encoding());
        }
        // Noise does not compress by a sixteenth: LZ4 declines.
        let mut x = 1u64;
        for b in pages.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        assert_eq!(Lz4.encode(&pages, &mut out), None);
    }
}
