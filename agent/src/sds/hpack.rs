//! A first pass over a client's HPACK header block, before the decoder keeps
//! anything: it counts the fields (at most [`MAX_FIELDS`]), adds up what the literal
//! names and values hold once decoded (at most the list limit, checked as it goes),
//! and rewrites every Huffman-coded string as a plain one. Huffman strings are
//! decoded with `httlib-huffman`'s static, table-driven decoder, so a string costs
//! a table step per few bits instead of a freshly built code table (loona-hpack
//! builds one per string, which made Huffman-coded headers about 200 times as
//! costly as plain ones); the decoder that follows then never meets one.
//!
//! Only representations are parsed here (RFC 7541 §6); the dynamic table, and so
//! what an index means, stays the decoder's business.

use httlib_huffman::DecoderSpeed;

/// Header fields one block may hold: a gRPC request has about ten.
pub(super) const MAX_FIELDS: usize = 256;

/// Why a block is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum BlockError {
    #[error("HPACK: the block ends inside a field")]
    Truncated,
    #[error("HPACK: an integer is longer than any this side accepts")]
    Integer,
    #[error("HPACK: an invalid Huffman string")]
    Huffman,
    #[error("more than {MAX_FIELDS} header fields in one block")]
    TooManyFields,
    #[error("header list larger than {0} bytes once decoded")]
    TooLarge(usize),
}

/// An HPACK integer with an `prefix`-bit prefix at the start of `buf`: its value and
/// how many bytes it took. Values past 2^21 are refused (no length or index here is
/// near that).
fn integer(buf: &[u8], prefix: u8) -> Result<(usize, usize), BlockError> {
    let mask = (1usize << prefix) - 1;
    let first = usize::from(*buf.first().ok_or(BlockError::Truncated)?) & mask;
    if first < mask {
        return Ok((first, 1));
    }
    let mut value = mask;
    for (i, &b) in buf.iter().enumerate().skip(1) {
        let shift = 7 * (i - 1);
        if shift > 14 {
            return Err(BlockError::Integer);
        }
        value += usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(BlockError::Truncated)
}

/// Writes `value` as an HPACK integer with a `prefix`-bit prefix after `flags`.
fn put_integer(out: &mut Vec<u8>, flags: u8, value: usize, prefix: u8) {
    let mask = (1usize << prefix) - 1;
    if value < mask {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// The block state of one pass.
struct Pass<'a> {
    block: &'a [u8],
    pos: usize,
    out: Vec<u8>,
    /// Decoded bytes of the literals so far, counted as HTTP/2 does.
    size: usize,
    max_list: usize,
    scratch: Vec<u8>,
}

impl Pass<'_> {
    /// Copies a representation's first byte and integer as they are; the integer.
    fn head(&mut self, prefix: u8) -> Result<usize, BlockError> {
        let (value, n) = integer(&self.block[self.pos..], prefix)?;
        self.out
            .extend_from_slice(&self.block[self.pos..self.pos + n]);
        self.pos += n;
        Ok(value)
    }

    /// Copies a string literal, plain; its decoded length.
    fn string(&mut self) -> Result<usize, BlockError> {
        let rest = &self.block[self.pos..];
        let huffman = rest.first().ok_or(BlockError::Truncated)? & 0x80 != 0;
        let (len, n) = integer(rest, 7)?;
        let data = rest.get(n..n + len).ok_or(BlockError::Truncated)?;
        let decoded = if huffman {
            self.scratch.clear();
            httlib_huffman::decode(data, &mut self.scratch, DecoderSpeed::FourBits)
                .map_err(|_| BlockError::Huffman)?;
            put_integer(&mut self.out, 0, self.scratch.len(), 7);
            self.out.extend_from_slice(&self.scratch);
            self.scratch.len()
        } else {
            self.out.extend_from_slice(&rest[..n + len]);
            len
        };
        self.pos += n + len;
        Ok(decoded)
    }

    /// A literal field after its head: the name when `indexed_name` is false, then
    /// the value.
    fn literal(&mut self, indexed_name: bool) -> Result<(), BlockError> {
        let name = if indexed_name { 0 } else { self.string()? };
        let value = self.string()?;
        self.size = self.size.saturating_add(name + value + 32);
        if self.size > self.max_list {
            return Err(BlockError::TooLarge(self.max_list));
        }
        Ok(())
    }
}

/// `block` with every Huffman string made plain, once it is known to hold at most
/// [`MAX_FIELDS`] fields whose literals decode to at most `max_list` bytes (fields
/// that refer to the table are counted by the decoder, which knows their size).
pub(super) fn plain(block: &[u8], max_list: usize) -> Result<Vec<u8>, BlockError> {
    let mut pass = Pass {
        block,
        pos: 0,
        out: Vec::with_capacity(block.len()),
        size: 0,
        max_list,
        scratch: Vec::new(),
    };
    let mut fields = 0;
    while pass.pos < block.len() {
        let first = block[pass.pos];
        if first & 0xe0 == 0x20 {
            // Dynamic table size update: not a field.
            pass.head(5)?;
            continue;
        }
        fields += 1;
        if fields > MAX_FIELDS {
            return Err(BlockError::TooManyFields);
        }
        if first & 0x80 != 0 {
            // Indexed field.
            pass.head(7)?;
        } else if first & 0x40 != 0 {
            // Literal with incremental indexing.
            let index = pass.head(6)?;
            pass.literal(index != 0)?;
        } else {
            // Literal without indexing, or never indexed.
            let index = pass.head(4)?;
            pass.literal(index != 0)?;
        }
    }
    Ok(pass.out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use loona_hpack::{Decoder, Encoder};

    fn decoded(block: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        Decoder::new()
            .decode_with_cb(block, |n, v| out.push((n.into_owned(), v.into_owned())))
            .unwrap();
        out
    }

    #[test]
    fn integers_round_trip_and_are_bounded() {
        for prefix in [4, 5, 6, 7] {
            for value in [
                0,
                1,
                14,
                15,
                30,
                31,
                62,
                63,
                126,
                127,
                128,
                300,
                16_383,
                1 << 20,
            ] {
                let mut out = Vec::new();
                put_integer(&mut out, 0, value, prefix);
                assert_eq!(integer(&out, prefix).unwrap(), (value, out.len()));
            }
        }
        assert_eq!(
            integer(&[0x7f, 0xff, 0xff, 0xff, 0x7f], 7),
            Err(BlockError::Integer)
        );
        assert_eq!(integer(&[0x7f, 0xff], 7), Err(BlockError::Truncated));
        assert_eq!(integer(&[], 7), Err(BlockError::Truncated));
    }

    /// Huffman strings as real clients send them (RFC 7541 C.4.1: `www.example.com`),
    /// made plain, decode to the same fields.
    #[test]
    fn huffman_strings_become_plain_and_mean_the_same() {
        let rfc = [
            0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
            0x90, 0xf4, 0xff,
        ];
        let plain_block = plain(&rfc, 1 << 16).unwrap();
        assert_eq!(decoded(&plain_block), decoded(&rfc));
        assert!(
            decoded(&plain_block).contains(&(b":authority".to_vec(), b"www.example.com".to_vec()))
        );
        // No Huffman flag left on any string: the literal's length byte is plain.
        assert_eq!(plain_block[4], 15);
        // A plain block passes unchanged.
        let mut encoder = Encoder::new();
        let block = encoder.encode([(&b":path"[..], &b"/x"[..]), (b"x-a", b"b")]);
        assert_eq!(plain(&block, 1 << 16).unwrap(), block);
    }

    #[test]
    fn blocks_are_refused_past_the_field_count_or_the_literal_size() {
        // 300 references to a static entry: each one byte.
        let refs = vec![0x82; MAX_FIELDS + 1];
        assert_eq!(plain(&refs, 1 << 16), Err(BlockError::TooManyFields));
        assert!(plain(&refs[..MAX_FIELDS], 1 << 16).is_ok());
        // A literal whose value alone is over the limit: refused before decoding on.
        let mut big = vec![0x00, 0x01, b'x'];
        put_integer(&mut big, 0, 5000, 7);
        big.extend(std::iter::repeat_n(b'v', 5000));
        assert_eq!(plain(&big, 4096), Err(BlockError::TooLarge(4096)));
        // Truncated and broken input.
        assert_eq!(plain(&big[..100], 1 << 16), Err(BlockError::Truncated));
        // The end-of-string code inside a string (30 one bits) is invalid.
        assert_eq!(
            plain(&[0x00, 0x84, 0xff, 0xff, 0xff, 0xff, 0x00], 1 << 16),
            Err(BlockError::Huffman)
        );
    }
}
