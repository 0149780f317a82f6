//! Sealing an image on an encrypted store (docs/ENCRYPTION.md): every
//! chunk's payload is encrypted and every chunk header and the image header
//! (with the metadata) are authenticated, with AES-256-GCM under a data key
//! drawn for this one image. The key reaches ksave in its config and lies
//! on disk only in the store's key block, which the host writes through
//! the volume's own encryption ([`KeyBlock`]).
//!
//! Nonces: the key is fresh for every image and ksave wipes it before it
//! jumps back, so a nonce need only be unique inside one image: chunk `i`
//! uses `i` and the header a value no chunk index takes.

use aes::Aes256;
use aes::cipher::{BlockEncrypt, InnerIvInit, StreamCipher};
use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use ctr::Ctr32BE;
use ghash::GHash;
use ghash::universal_hash::UniversalHash;
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use crate::{CRC32C, PAGE};

/// Bytes of a data key.
pub const KEY_LEN: usize = 32;
/// Bytes of an authentication tag.
pub const TAG_LEN: usize = 16;

/// A data key; wiped when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct DataKey(pub [u8; KEY_LEN]);

impl Drop for DataKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl core::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Never printed.
        f.write_str("DataKey(..)")
    }
}

/// What a tag is about: its nonce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sealed {
    /// Chunk `index`.
    Chunk(u64),
    /// The image header (which carries the metadata's tag).
    Header,
    /// The metadata blocks.
    Meta,
}

impl Sealed {
    fn nonce(self) -> Nonce<aes_gcm::aead::consts::U12> {
        let mut n = [0u8; 12];
        match self {
            Self::Chunk(index) => n[..8].copy_from_slice(&index.to_le_bytes()),
            // No chunk index sets the last four bytes.
            Self::Header => n[8..].copy_from_slice(b"HEAD"),
            Self::Meta => n[8..].copy_from_slice(b"META"),
        }
        n.into()
    }
}

/// The tag did not check: the data is not what the key's holder wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forged;

/// AES-256-GCM under one image's data key (the key schedules are wiped
/// when dropped): aes-gcm's, and the block cipher alone for
/// [`Self::open_in_pieces`].
pub struct Seal(Aes256Gcm, Aes256);

impl Seal {
    /// The cipher for `key`.
    pub fn new(key: &DataKey) -> Self {
        Self(Aes256Gcm::new(&key.0.into()), Aes256::new(&key.0.into()))
    }

    /// [`Self::open`] for data that lies in pieces (a sealed raw chunk's
    /// pages, read where they belong), as GCM does it (NIST SP 800-38D,
    /// 7.2; aes-gcm 0.10's `AesGcm::decrypt_in_place_detached`): feed every
    /// piece in order to [`OpenInPieces::hash`], check the tag, then
    /// decrypt every piece in the same order.
    pub fn open_in_pieces(&self, what: Sealed, aad: &[u8]) -> OpenInPieces {
        // H = E(0^128); J0 = nonce || 0^31 || 1 for a 96-bit nonce; the
        // tag's mask is E(J0); the data's keystream starts at inc32(J0).
        let mut h = aes::Block::default();
        self.1.encrypt_block(&mut h);
        let mut ghash = GHash::new(&h);
        ghash.update_padded(aad);
        let mut j0 = [0u8; 16];
        j0[..12].copy_from_slice(&what.nonce());
        j0[15] = 1;
        let mut ctr = Ctr32BE::<Aes256>::from_core(ctr::CtrCore::inner_iv_init(self.1.clone(), &j0.into()));
        let mut mask = [0u8; 16];
        ctr.apply_keystream(&mut mask);
        OpenInPieces { ghash, ctr, mask, aad_len: aad.len() as u64, data_len: 0 }
    }

    /// Encrypts `data` in place, binding `aad`; returns the tag.
    pub fn seal(&self, what: Sealed, aad: &[u8], data: &mut [u8]) -> [u8; TAG_LEN] {
        self.0.encrypt_in_place_detached(&what.nonce(), aad, data).expect("a chunk is far below GCM's length limit").into()
    }

    /// Checks `tag` over `aad` and `data`, and only then decrypts `data` in
    /// place; on [`Forged`] `data` is left as it was.
    pub fn open(&self, what: Sealed, aad: &[u8], data: &mut [u8], tag: &[u8; TAG_LEN]) -> Result<(), Forged> {
        self.0.decrypt_in_place_detached(&what.nonce(), aad, data, Tag::from_slice(tag)).map_err(|_| Forged)
    }

    /// The metadata's tag (the header carries it): over the metadata
    /// bytes `meta`, which stay plaintext. `scratch` (at least as long) is
    /// overwritten.
    pub fn meta_tag(&self, meta: &[u8], scratch: &mut [u8]) -> [u8; TAG_LEN] {
        let scratch = &mut scratch[..meta.len()];
        scratch.copy_from_slice(meta);
        let tag = self.seal(Sealed::Meta, &[], scratch);
        scratch.zeroize();
        tag
    }

    /// The header's tag: over the header block `block` as it reads when
    /// complete ([`crate::header::Header::tagged_block`]; its tag and CRC
    /// left out).
    pub fn header_tag(&self, block: &[u8; PAGE]) -> [u8; TAG_LEN] {
        self.seal(Sealed::Header, &block[..HEADER_TAG_AT], &mut [])
    }

    /// Checks a tag made by [`Self::meta_tag`] or [`Self::header_tag`]
    /// against `expected`, in constant time.
    pub fn check(made: [u8; TAG_LEN], expected: &[u8; TAG_LEN]) -> Result<(), Forged> {
        if bool::from(made.ct_eq(expected)) { Ok(()) } else { Err(Forged) }
    }
}

/// A GCM opening fed piece by piece ([`Seal::open_in_pieces`]).
pub struct OpenInPieces {
    ghash: GHash,
    ctr: Ctr32BE<Aes256>,
    mask: [u8; 16],
    aad_len: u64,
    data_len: u64,
}

impl OpenInPieces {
    /// Feeds the next piece of ciphertext to the tag: whole 16-byte
    /// blocks but for the last piece.
    pub fn hash(&mut self, piece: &[u8]) {
        debug_assert!(self.data_len.is_multiple_of(16), "only the last piece may end mid-block");
        self.ghash.update_padded(piece);
        self.data_len += piece.len() as u64;
    }

    /// Checks `tag` over everything fed, in constant time: the decrypter
    /// of the pieces, in the same order, if it holds.
    pub fn check(self, tag: &[u8; TAG_LEN]) -> Result<Decrypter, Forged> {
        let mut lengths = ghash::Block::default();
        lengths[..8].copy_from_slice(&(self.aad_len * 8).to_be_bytes());
        lengths[8..].copy_from_slice(&(self.data_len * 8).to_be_bytes());
        let mut ghash = self.ghash;
        ghash.update(&[lengths]);
        let mut made: [u8; TAG_LEN] = ghash.finalize().into();
        for (m, k) in made.iter_mut().zip(self.mask) {
            *m ^= k;
        }
        Seal::check(made, tag).map(|()| Decrypter(self.ctr))
    }
}

/// Decrypts the pieces of a checked opening, in order.
pub struct Decrypter(Ctr32BE<Aes256>);

impl Decrypter {
    /// Decrypts the next piece in place: whole 16-byte blocks but for the last.
    pub fn decrypt(&mut self, piece: &mut [u8]) {
        self.0.apply_keystream(piece);
    }
}

/// Where a sealed image's header keeps its tag: right before its CRC.
pub const HEADER_TAG_AT: usize = PAGE - 4 - TAG_LEN;
/// Where it keeps the metadata's tag: right before the header's own.
pub const META_TAG_AT: usize = HEADER_TAG_AT - TAG_LEN;

/// Where a chunk header of `len` bytes keeps its tag: right before its CRC
/// (zero in a plain image). Everything before it is the tag's associated
/// data.
pub const fn chunk_tag_at(len: usize) -> usize {
    len - 4 - TAG_LEN
}

/// "KSAVEKEY".
pub const KEY_MAGIC: [u8; 8] = *b"KSAVEKEY";

/// The key block: one page of the store, on the encrypted volume, written
/// and read only through the volume's own encryption (dm-crypt), never by
/// ksave. It names the image its key opens; destroyed (zeroed) after a
/// resume and at any boot that does not resume, after which not even the
/// volume's passphrase opens that image.
#[derive(Clone, Debug)]
pub struct KeyBlock {
    /// The store's claim id (the image header's).
    pub claim_id: [u8; 16],
    /// The image's nonce (its header's): the key is this image's.
    pub nonce: u64,
    /// The data key.
    pub key: DataKey,
}

/// Why a key block was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyBlockError {
    /// All zeros, or no magic: no key (destroyed, or never written).
    NoKey,
    /// Damaged.
    Checksum,
}

impl core::fmt::Display for KeyBlockError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoKey => write!(f, "no key in the key block (destroyed after a resume, or never written)"),
            Self::Checksum => write!(f, "the key block is damaged"),
        }
    }
}

impl KeyBlock {
    /// Encodes into one page: magic, version 1, claim id at 16, nonce at
    /// 32, key at 40, CRC-32C of bytes 0..72 at 72, zeros after.
    pub fn encode(&self, page: &mut [u8; PAGE]) {
        page.fill(0);
        page[..8].copy_from_slice(&KEY_MAGIC);
        page[8..12].copy_from_slice(&1u32.to_le_bytes());
        page[16..32].copy_from_slice(&self.claim_id);
        page[32..40].copy_from_slice(&self.nonce.to_le_bytes());
        page[40..72].copy_from_slice(&self.key.0);
        let crc = CRC32C.checksum(&page[..72]);
        page[72..76].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes one page.
    pub fn decode(page: &[u8; PAGE]) -> Result<Self, KeyBlockError> {
        if page[..8] != KEY_MAGIC || page[8..12] != 1u32.to_le_bytes() {
            return Err(KeyBlockError::NoKey);
        }
        if CRC32C.checksum(&page[..72]).to_le_bytes() != page[72..76] {
            return Err(KeyBlockError::Checksum);
        }
        let mut key = DataKey([0; KEY_LEN]);
        key.0.copy_from_slice(&page[40..72]);
        Ok(Self { claim_id: page[16..32].try_into().unwrap(), nonce: u64::from_le_bytes(page[32..40].try_into().unwrap()), key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_in_pieces_opens_as_gcm_opens_it_whole() {
        let seal = Seal::new(&DataKey([9; KEY_LEN]));
        let plain: std::vec::Vec<u8> = (0..3 * PAGE).map(|i| (i * 31 / 7) as u8).collect();
        let mut sealed = plain.clone();
        let tag = seal.seal(Sealed::Chunk(41), b"the chunk header", &mut sealed);
        let open = |data: &mut [u8], what, aad: &[u8], tag: &[u8; TAG_LEN]| {
            let mut opening = seal.open_in_pieces(what, aad);
            data.chunks(PAGE).for_each(|p| opening.hash(p));
            let mut decrypter = opening.check(tag)?;
            data.chunks_mut(PAGE).for_each(|p| decrypter.decrypt(p));
            Ok::<(), Forged>(())
        };
        let mut data = sealed.clone();
        open(&mut data, Sealed::Chunk(41), b"the chunk header", &tag).expect("opens");
        assert_eq!(data, plain);
        // Another chunk's nonce, other associated data, a flipped bit, another tag.
        let mut flipped = sealed.clone();
        flipped[PAGE + 5] ^= 1;
        let mut other_tag = tag;
        other_tag[0] ^= 1;
        for (mut data, what, aad, tag) in [
            (sealed.clone(), Sealed::Chunk(42), &b"the chunk header"[..], tag),
            (sealed.clone(), Sealed::Chunk(41), &b"the chunk headex"[..], tag),
            (flipped, Sealed::Chunk(41), &b"the chunk header"[..], tag),
            (sealed.clone(), Sealed::Chunk(41), &b"the chunk header"[..], other_tag),
        ] {
            assert_eq!(open(&mut data, what, aad, &tag), Err(Forged));
        }
    }

    #[test]
    fn a_sealed_payload_opens_only_with_its_key_nonce_and_data() {
        let seal = Seal::new(&DataKey([7; KEY_LEN]));
        let plain = [0x5au8; 256];
        let mut data = plain;
        let tag = seal.seal(Sealed::Chunk(3), b"aad", &mut data);
        assert_ne!(data, plain);
        let mut copy = data;
        assert_eq!(Seal::new(&DataKey([8; KEY_LEN])).open(Sealed::Chunk(3), b"aad", &mut copy, &tag), Err(Forged));
        assert_eq!(seal.open(Sealed::Chunk(4), b"aad", &mut copy, &tag), Err(Forged));
        assert_eq!(seal.open(Sealed::Chunk(3), b"aaD", &mut copy, &tag), Err(Forged));
        copy[9] ^= 1;
        assert_eq!(seal.open(Sealed::Chunk(3), b"aad", &mut copy, &tag), Err(Forged));
        assert_eq!(copy[..9], data[..9], "a refused payload is left as it was");
        seal.open(Sealed::Chunk(3), b"aad", &mut data, &tag).unwrap();
        assert_eq!(data, plain);
    }

    #[test]
    fn the_key_block_round_trips_and_a_zeroed_one_holds_no_key() {
        let mut page = [0u8; PAGE];
        KeyBlock { claim_id: [1; 16], nonce: 42, key: DataKey([9; KEY_LEN]) }.encode(&mut page);
        let back = KeyBlock::decode(&page).unwrap();
        assert_eq!((back.claim_id, back.nonce, back.key.0), ([1; 16], 42, [9; KEY_LEN]));
        page[50] ^= 1;
        assert_eq!(KeyBlock::decode(&page).err(), Some(KeyBlockError::Checksum));
        assert_eq!(KeyBlock::decode(&[0; PAGE]).err(), Some(KeyBlockError::NoKey));
    }
}
