//! The bytes on disk, sans-IO: segment header and record frame encoding and
//! decoding over plain slices. Nothing here touches the kernel, which is what
//! lets recovery, the iterator, replication and the fuzz-style tests share it.
//! The layout is documented field by field in `wal/FORMAT.md` and below.

/// Segment header (64 bytes, little endian), at offset 0 of every segment:
///
/// | offset | size | field |
/// | --- | --- | --- |
/// | 0 | 8 | magic `b"IRISWAL\0"` |
/// | 8 | 4 | format version (`FORMAT_VERSION`) |
/// | 12 | 4 | header length in bytes (64) |
/// | 16 | 8 | base position: position of the segment's first record |
/// | 24 | 8 | segment size in bytes (the file length) |
/// | 32 | 4 | CRC32 of bytes 0..32 |
/// | 36 | 4 | zero (reserved) |
/// | 40 | 8 | durable mark: a position known durable when it was written |
/// | 48 | 4 | CRC32 of bytes 40..48 (0 with a zero mark: no mark yet) |
/// | 52 | 12 | zero (reserved) |
///
/// The durable mark is rewritten in place after each group commit completes
/// (it rides on the next one). It is only ever set to a position already
/// durable, so recovery can tell damage to acknowledged records (at or below
/// the highest mark: an error) from a tail cut off by a crash (above it).
pub const SEGMENT_HEADER_LEN: usize = 64;
const DURABLE_MARK_OFFSET: usize = 40;
/// The header bytes `encode_durable_mark` writes: the mark and its CRC.
pub const DURABLE_MARK_RANGE: std::ops::Range<usize> =
    DURABLE_MARK_OFFSET..DURABLE_MARK_OFFSET + 12;
pub const SEGMENT_MAGIC: [u8; 8] = *b"IRISWAL\0";
pub const FORMAT_VERSION: u32 = 1;
const SEGMENT_HEADER_CRC_OFFSET: usize = 32;

/// Record frame (little endian), starting at an 8-byte aligned offset:
///
/// | offset | size | field |
/// | --- | --- | --- |
/// | 0 | 4 | payload length `len` |
/// | 4 | 4 | CRC32 of bytes 8..25+len (everything after this field) |
/// | 8 | 8 | log position (dense, from 1) |
/// | 16 | 8 | epoch |
/// | 24 | 1 | record type |
/// | 25 | len | payload |
/// | 25+len | 0-7 | zero padding to the next multiple of 8 |
///
/// A header of 25 zero bytes marks the end of the records in a segment (the
/// segment is preallocated with zeros, and position 0 is never used).
pub const RECORD_HEADER_LEN: usize = 25;
pub const RECORD_ALIGN: usize = 8;
const RECORD_CRC_START: usize = 8;

// Records start right after the segment header, aligned.
const _: () = assert!(SEGMENT_HEADER_LEN.is_multiple_of(RECORD_ALIGN));

/// One record as stored. Borrowed from the segment it lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub position: u64,
    pub epoch: u64,
    pub record_type: u8,
    pub payload: &'a [u8],
}

/// The decoded fields of a segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub base_position: u64,
    pub segment_size_bytes: u64,
}

/// Bytes a record with a payload of `payload_len` bytes occupies, padding included.
#[inline]
pub fn frame_len(payload_len: usize) -> usize {
    (RECORD_HEADER_LEN + payload_len).next_multiple_of(RECORD_ALIGN)
}

pub fn encode_segment_header(header: &SegmentHeader, out: &mut [u8]) {
    assert!(out.len() >= SEGMENT_HEADER_LEN);
    assert!(header.base_position >= 1);
    let out = &mut out[..SEGMENT_HEADER_LEN];
    out.fill(0);
    out[0..8].copy_from_slice(&SEGMENT_MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
    out[16..24].copy_from_slice(&header.base_position.to_le_bytes());
    out[24..32].copy_from_slice(&header.segment_size_bytes.to_le_bytes());
    let crc = crc32fast::hash(&out[..SEGMENT_HEADER_CRC_OFFSET]);
    out[32..36].copy_from_slice(&crc.to_le_bytes());
}

/// Why a segment header was rejected; recovery turns it into a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    Zero,
    TooShort,
    BadMagic,
    BadCrc { stored: u32, computed: u32 },
    UnsupportedVersion(u32),
    BadField(&'static str),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Zero => write!(f, "segment header is all zeros"),
            HeaderError::TooShort => write!(f, "file shorter than a segment header"),
            HeaderError::BadMagic => write!(f, "bad segment magic"),
            HeaderError::BadCrc { stored, computed } => {
                write!(
                    f,
                    "segment header CRC {stored:#010x} != computed {computed:#010x}"
                )
            }
            HeaderError::UnsupportedVersion(v) => write!(f, "unsupported format version {v}"),
            HeaderError::BadField(what) => write!(f, "bad segment header field: {what}"),
        }
    }
}

pub fn decode_segment_header(bytes: &[u8]) -> Result<SegmentHeader, HeaderError> {
    if bytes.len() < SEGMENT_HEADER_LEN {
        return Err(HeaderError::TooShort);
    }
    let h = &bytes[..SEGMENT_HEADER_LEN];
    if h.iter().all(|&b| b == 0) {
        return Err(HeaderError::Zero);
    }
    let stored = u32_at(h, SEGMENT_HEADER_CRC_OFFSET);
    let computed = crc32fast::hash(&h[..SEGMENT_HEADER_CRC_OFFSET]);
    if h[0..8] != SEGMENT_MAGIC {
        return Err(HeaderError::BadMagic);
    }
    if stored != computed {
        return Err(HeaderError::BadCrc { stored, computed });
    }
    let version = u32_at(h, 8);
    if version != FORMAT_VERSION {
        return Err(HeaderError::UnsupportedVersion(version));
    }
    if u32_at(h, 12) as usize != SEGMENT_HEADER_LEN {
        return Err(HeaderError::BadField("header length"));
    }
    let header = SegmentHeader {
        base_position: u64_at(h, 16),
        segment_size_bytes: u64_at(h, 24),
    };
    if header.base_position == 0 {
        return Err(HeaderError::BadField("base position 0"));
    }
    if header.segment_size_bytes != bytes.len() as u64 {
        return Err(HeaderError::BadField(
            "segment size differs from file length",
        ));
    }
    Ok(header)
}

/// Records that every position up to `position` is durable.
#[inline]
pub fn encode_durable_mark(position: u64, segment: &mut [u8]) {
    let mark = &mut segment[DURABLE_MARK_RANGE];
    mark[..8].copy_from_slice(&position.to_le_bytes());
    let crc = crc32fast::hash(&mark[..8]);
    mark[8..].copy_from_slice(&crc.to_le_bytes());
}

/// The durable mark, or `None` if absent or torn (then it proves nothing).
pub fn decode_durable_mark(segment: &[u8]) -> Option<u64> {
    if segment.len() < SEGMENT_HEADER_LEN {
        return None;
    }
    let mark = &segment[DURABLE_MARK_OFFSET..DURABLE_MARK_OFFSET + 12];
    let position = u64_at(mark, 0);
    (position != 0 && crc32fast::hash(&mark[..8]) == u32_at(mark, 8)).then_some(position)
}

/// Writes one record frame, padding zeros included, at the start of `out`
/// and returns its length. `out` may hold old bytes (a reused staging buffer).
#[inline]
pub fn encode_record(out: &mut [u8], record: &Record<'_>) -> usize {
    let payload_len = record.payload.len();
    let len = frame_len(payload_len);
    assert!(out.len() >= len, "record frame does not fit");
    assert!(record.position >= 1);
    let (header, rest) = out.split_at_mut(RECORD_HEADER_LEN);
    header[0..4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    header[8..16].copy_from_slice(&record.position.to_le_bytes());
    header[16..24].copy_from_slice(&record.epoch.to_le_bytes());
    header[24] = record.record_type;
    rest[..payload_len].copy_from_slice(record.payload);
    rest[payload_len..len - RECORD_HEADER_LEN].fill(0);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[RECORD_CRC_START..]);
    hasher.update(record.payload);
    header[4..8].copy_from_slice(&hasher.finalize().to_le_bytes());
    len
}

/// The result of reading the bytes at a record boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole, checksum-valid record and its frame length.
    Record(Record<'a>, usize),
    /// A zero header, or no room left for one: no record starts here.
    End,
    /// Something is here, but it is not a valid record.
    Bad(BadRecord),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadRecord {
    LengthOverLimit { len: u32, max: u32 },
    PastEnd { len: u32 },
    Crc { stored: u32, computed: u32 },
    NonZeroPadding,
    PositionZero,
}

impl std::fmt::Display for BadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadRecord::LengthOverLimit { len, max } => {
                write!(f, "record length {len} over the limit {max}")
            }
            BadRecord::PastEnd { len } => {
                write!(f, "record length {len} runs past the segment end")
            }
            BadRecord::Crc { stored, computed } => {
                write!(f, "record CRC {stored:#010x} != computed {computed:#010x}")
            }
            BadRecord::NonZeroPadding => write!(f, "non-zero record padding"),
            BadRecord::PositionZero => write!(f, "record with position 0"),
        }
    }
}

/// Reads the record starting at `bytes[0]`, bounded by `payload_len_max`
/// before anything is trusted, and checks its CRC and padding.
pub fn decode_record(bytes: &[u8], payload_len_max: u32) -> Decoded<'_> {
    if bytes.len() < RECORD_HEADER_LEN {
        return Decoded::End;
    }
    let header = &bytes[..RECORD_HEADER_LEN];
    if header.iter().all(|&b| b == 0) {
        return Decoded::End;
    }
    let len = u32_at(header, 0);
    if len > payload_len_max {
        return Decoded::Bad(BadRecord::LengthOverLimit {
            len,
            max: payload_len_max,
        });
    }
    let frame = frame_len(len as usize);
    if frame > bytes.len() {
        return Decoded::Bad(BadRecord::PastEnd { len });
    }
    let body_end = RECORD_HEADER_LEN + len as usize;
    let stored = u32_at(header, 4);
    let computed = crc32fast::hash(&bytes[RECORD_CRC_START..body_end]);
    if stored != computed {
        return Decoded::Bad(BadRecord::Crc { stored, computed });
    }
    if bytes[body_end..frame].iter().any(|&b| b != 0) {
        return Decoded::Bad(BadRecord::NonZeroPadding);
    }
    let position = u64_at(header, 8);
    if position == 0 {
        return Decoded::Bad(BadRecord::PositionZero);
    }
    let record = Record {
        position,
        epoch: u64_at(header, 16),
        record_type: header[24],
        payload: &bytes[RECORD_HEADER_LEN..body_end],
    };
    Decoded::Record(record, frame)
}

/// Frame length of the record at `bytes[0]`, trusting its length field.
/// Only for bytes this process wrote or recovery already verified.
#[inline]
pub(crate) fn trusted_frame_len(bytes: &[u8]) -> usize {
    frame_len(u32_at(bytes, 0) as usize)
}

#[inline]
fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"))
}

#[inline]
fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(payload: &[u8]) -> Record<'_> {
        Record {
            position: 7,
            epoch: 3,
            record_type: 9,
            payload,
        }
    }

    #[test]
    fn record_round_trips_with_padding() {
        for len in [0usize, 1, 7, 8, 100, 1000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8 ^ 0x5a).collect();
            let mut buf = vec![0u8; 2048];
            let n = encode_record(&mut buf, &sample(&payload));
            assert_eq!(n, frame_len(len));
            assert_eq!(n % RECORD_ALIGN, 0);
            match decode_record(&buf, 4096) {
                Decoded::Record(r, m) => {
                    assert_eq!(m, n);
                    assert_eq!(r, sample(&payload));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let mut buf = vec![0u8; 64];
        let n = encode_record(&mut buf, &sample(b"hello wal"));
        for bit in 0..n * 8 {
            let mut copy = buf.clone();
            copy[bit / 8] ^= 1 << (bit % 8);
            assert!(
                !matches!(decode_record(&copy, 4096), Decoded::Record(..)),
                "bit {bit}"
            );
        }
    }

    #[test]
    fn zero_header_is_end_and_short_tail_is_end() {
        assert_eq!(decode_record(&[0u8; 64], 10), Decoded::End);
        assert_eq!(decode_record(&[1u8; 10], 10), Decoded::End);
    }

    #[test]
    fn length_is_bounded_before_use() {
        let mut buf = vec![0u8; 64];
        encode_record(&mut buf, &sample(&[1; 20]));
        assert!(matches!(
            decode_record(&buf, 10),
            Decoded::Bad(BadRecord::LengthOverLimit { .. })
        ));
        assert!(matches!(
            decode_record(&buf[..40], 100),
            Decoded::Bad(BadRecord::PastEnd { .. })
        ));
    }

    #[test]
    fn segment_header_round_trips_and_rejects_damage() {
        let mut buf = vec![0u8; 4096];
        let h = SegmentHeader {
            base_position: 42,
            segment_size_bytes: 4096,
        };
        encode_segment_header(&h, &mut buf);
        assert_eq!(decode_segment_header(&buf), Ok(h));
        let mut bad = buf.clone();
        bad[17] ^= 1;
        assert!(matches!(
            decode_segment_header(&bad),
            Err(HeaderError::BadCrc { .. })
        ));
        bad = buf.clone();
        bad[0] = b'X';
        assert_eq!(decode_segment_header(&bad), Err(HeaderError::BadMagic));
        assert_eq!(
            decode_segment_header(&vec![0u8; 4096]),
            Err(HeaderError::Zero)
        );
        assert!(matches!(
            decode_segment_header(&buf[..2048]),
            Err(HeaderError::BadField(_))
        ));
    }

    #[test]
    fn durable_mark_is_outside_the_header_crc_and_checked_on_its_own() {
        let mut buf = vec![0u8; 4096];
        let h = SegmentHeader {
            base_position: 42,
            segment_size_bytes: 4096,
        };
        encode_segment_header(&h, &mut buf);
        assert_eq!(decode_durable_mark(&buf), None);
        encode_durable_mark(99, &mut buf);
        assert_eq!(decode_segment_header(&buf), Ok(h));
        assert_eq!(decode_durable_mark(&buf), Some(99));
        buf[41] ^= 1; // a torn mark proves nothing
        assert_eq!(decode_durable_mark(&buf), None);
    }
}
