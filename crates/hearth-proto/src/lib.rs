//! The protocol spoken between the host (`hearth-vm`) and the guest agent
//! (`hearth-agent`) over one virtio-serial port.
//!
//! # Framing
//! Every frame is a 12-byte header followed by a payload:
//!
//! ```text
//! | len: u32 LE | stream: u32 LE | kind: u8 | flags: u8 | reserved: u16 (0) | payload (len bytes) |
//! ```
//!
//! `len` is at most [`MAX_PAYLOAD`]. A frame whose length is larger, or whose kind is
//! unknown, is consumed (its payload is skipped without being buffered) and reported
//! as [`Incoming::Rejected`] so that the receiver closes *that stream* with an error;
//! the connection itself stays in sync and alive.
//!
//! # Streams
//! The host opens streams (ids chosen by the host, never 0) with an [`FrameKind::Open`]
//! frame whose payload is a JSON [`Request`]. Both sides then exchange `Data`, `Eof`,
//! and finally the guest ends the stream with `Exit`, `Reply` (for one-shot requests)
//! or `Error`. An exec stream with a pseudo-terminal ([`ExecRequest::pty`]) also
//! takes `Resize` frames from the host. Stream 0 carries the `Hello` handshake, which (re)starts a session:
//! after a snapshot restore the host connects anew, says hello, and the agent drops
//! whatever streams belonged to the previous connection.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

pub mod message;
pub use message::*;

/// Version of the protocol; the `Hello` exchange refuses a mismatch.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 256 * 1024;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 12;
/// Name of the virtio-serial port the agent listens on.
pub const PORT_NAME: &str = "hearth.agent";
/// The control stream id (handshake only).
pub const CONTROL_STREAM: u32 = 0;

/// Data flag: the bytes are the process's standard output.
pub const FLAG_STDOUT: u8 = 1;
/// Data flag: the bytes are the process's standard error.
pub const FLAG_STDERR: u8 = 2;

/// What a frame means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum FrameKind {
    /// Session handshake on stream 0 (JSON [`Hello`]).
    Hello = 1,
    /// Opens a stream (JSON [`Request`]).
    Open = 2,
    /// Stream bytes (stdin/stdout/stderr, file content, TCP bytes).
    Data = 3,
    /// No more `Data` in this direction (flags say which channel for exec output).
    Eof = 4,
    /// Host asks the guest to signal the stream's process (JSON [`SignalRequest`]).
    Signal = 5,
    /// A process ended (JSON [`ExitStatus`]); closes the stream.
    Exit = 6,
    /// The stream failed (JSON [`ErrorReply`]); closes the stream.
    Error = 7,
    /// A one-shot answer or an acknowledgement (JSON [`Reply`]).
    Reply = 8,
    /// The host abandons a stream; the guest frees it (kills an exec, closes a socket).
    Close = 9,
    /// Host sets the window size of an exec stream's pseudo-terminal (JSON
    /// [`ResizeRequest`]). Ignored on streams without a PTY; an out-of-range size
    /// fails the stream.
    Resize = 10,
}

impl FrameKind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Hello,
            2 => Self::Open,
            3 => Self::Data,
            4 => Self::Eof,
            5 => Self::Signal,
            6 => Self::Exit,
            7 => Self::Error,
            8 => Self::Reply,
            9 => Self::Close,
            10 => Self::Resize,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub stream: u32,
    pub kind: FrameKind,
    pub flags: u8,
    pub payload: Bytes,
}

impl Frame {
    pub fn new(stream: u32, kind: FrameKind, payload: impl Into<Bytes>) -> Self {
        Self {
            stream,
            kind,
            flags: 0,
            payload: payload.into(),
        }
    }

    /// A frame whose payload is `value` as JSON.
    pub fn json<T: Serialize>(stream: u32, kind: FrameKind, value: &T) -> Self {
        // Serialising our own message types cannot fail: they hold no maps with
        // non-string keys and no fallible Serialize impls.
        let payload = serde_json::to_vec(value).unwrap_or_default();
        Self::new(stream, kind, payload)
    }

    pub fn with_flags(mut self, flags: u8) -> Self {
        self.flags = flags;
        self
    }

    /// Parses the payload as JSON.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ProtoError> {
        serde_json::from_slice(&self.payload)
            .map_err(|_| ProtoError::BadPayload { kind: self.kind })
    }

    /// An `Error` frame for `stream`.
    pub fn error(stream: u32, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::json(
            stream,
            FrameKind::Error,
            &ErrorReply {
                kind,
                message: message.into(),
            },
        )
    }
}

/// What the decoder yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A well-formed frame.
    Frame(Frame),
    /// A frame that was skipped; the receiver should fail `stream` with `reason`.
    Rejected { stream: u32, reason: ProtoError },
}

/// Protocol errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ProtoError {
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    Oversized { len: usize, max: usize },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed {kind:?} payload")]
    BadPayload { kind: FrameKind },
    #[error("reserved header bits set")]
    BadHeader,
}

/// The codec for both directions.
#[derive(Debug, Default)]
pub struct FrameCodec {
    /// Bytes still to discard from a rejected frame.
    skipping: usize,
    /// Set when a header was read but the payload is not complete yet.
    pending: Option<(usize, u32, u8, u8)>,
}

impl Decoder for FrameCodec {
    type Item = Incoming;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Incoming>, std::io::Error> {
        loop {
            if self.skipping > 0 {
                let n = self.skipping.min(src.len());
                src.advance(n);
                self.skipping -= n;
                if self.skipping > 0 {
                    return Ok(None);
                }
            }
            let (len, stream, kind, flags) = match self.pending {
                Some(header) => header,
                None => {
                    if src.len() < HEADER_LEN {
                        src.reserve(HEADER_LEN);
                        return Ok(None);
                    }
                    let len = src.get_u32_le() as usize;
                    let stream = src.get_u32_le();
                    let kind = src.get_u8();
                    let flags = src.get_u8();
                    let reserved = src.get_u16_le();
                    let reason = if len > MAX_PAYLOAD {
                        Some(ProtoError::Oversized {
                            len,
                            max: MAX_PAYLOAD,
                        })
                    } else if FrameKind::from_u8(kind).is_none() {
                        Some(ProtoError::UnknownKind(kind))
                    } else if reserved != 0 {
                        Some(ProtoError::BadHeader)
                    } else {
                        None
                    };
                    if let Some(reason) = reason {
                        self.skipping = len;
                        // Drop what is already buffered of the bad payload now, so the
                        // caller sees the rejection promptly.
                        let n = self.skipping.min(src.len());
                        src.advance(n);
                        self.skipping -= n;
                        return Ok(Some(Incoming::Rejected { stream, reason }));
                    }
                    self.pending = Some((len, stream, kind, flags));
                    (len, stream, kind, flags)
                }
            };
            if src.len() < len {
                src.reserve(len - src.len());
                return Ok(None);
            }
            self.pending = None;
            let payload = src.split_to(len).freeze();
            // Checked when the header was read.
            let Some(kind) = FrameKind::from_u8(kind) else {
                continue;
            };
            return Ok(Some(Incoming::Frame(Frame {
                stream,
                kind,
                flags,
                payload,
            })));
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        if frame.payload.len() > MAX_PAYLOAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                ProtoError::Oversized {
                    len: frame.payload.len(),
                    max: MAX_PAYLOAD,
                },
            ));
        }
        dst.reserve(HEADER_LEN + frame.payload.len());
        dst.put_u32_le(frame.payload.len() as u32);
        dst.put_u32_le(frame.stream);
        dst.put_u8(frame.kind as u8);
        dst.put_u8(frame.flags);
        dst.put_u16_le(0);
        dst.put_slice(&frame.payload);
        Ok(())
    }
}

/// Encodes a raw header, for tests and fuzzing of hostile input.
pub fn raw_header(len: u32, stream: u32, kind: u8, flags: u8) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[0..4].copy_from_slice(&len.to_le_bytes());
    out[4..8].copy_from_slice(&stream.to_le_bytes());
    out[8] = kind;
    out[9] = flags;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(codec: &mut FrameCodec, buf: &mut BytesMut) -> Vec<Incoming> {
        let mut out = Vec::new();
        while let Some(item) = codec.decode(buf).expect("decode") {
            out.push(item);
        }
        out
    }

    #[test]
    fn round_trip() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let frame = Frame::new(7, FrameKind::Data, &b"hello"[..]).with_flags(FLAG_STDERR);
        codec.encode(frame.clone(), &mut buf).expect("encode");
        assert_eq!(
            decode_all(&mut codec, &mut buf),
            vec![Incoming::Frame(frame)]
        );
    }

    #[test]
    fn byte_at_a_time() {
        let mut codec = FrameCodec::default();
        let mut wire = BytesMut::new();
        let frames: Vec<Frame> = (1..5)
            .map(|i| Frame::new(i, FrameKind::Data, vec![i as u8; i as usize * 3]))
            .collect();
        for f in &frames {
            codec.encode(f.clone(), &mut wire).expect("encode");
        }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire {
            buf.put_u8(b);
            got.extend(decode_all(&mut codec, &mut buf));
        }
        let want: Vec<Incoming> = frames.into_iter().map(Incoming::Frame).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn oversized_frame_is_skipped_and_stream_rejected() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let big = MAX_PAYLOAD + 10;
        buf.put_slice(&raw_header(big as u32, 3, FrameKind::Data as u8, 0));
        buf.put_slice(&vec![0xAA; big]);
        codec
            .encode(Frame::new(4, FrameKind::Data, &b"ok"[..]), &mut buf)
            .expect("encode");
        let got = decode_all(&mut codec, &mut buf);
        assert_eq!(got.len(), 2);
        assert!(matches!(
            got[0],
            Incoming::Rejected {
                stream: 3,
                reason: ProtoError::Oversized { .. }
            }
        ));
        assert_eq!(
            got[1],
            Incoming::Frame(Frame::new(4, FrameKind::Data, &b"ok"[..]))
        );
    }

    #[test]
    fn unknown_kind_is_rejected_and_skipped_across_reads() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        buf.put_slice(&raw_header(6, 9, 200, 0));
        buf.put_slice(b"abc");
        let got = decode_all(&mut codec, &mut buf);
        assert_eq!(
            got,
            vec![Incoming::Rejected {
                stream: 9,
                reason: ProtoError::UnknownKind(200)
            }]
        );
        buf.put_slice(b"def");
        codec
            .encode(Frame::new(1, FrameKind::Eof, Bytes::new()), &mut buf)
            .expect("encode");
        let got = decode_all(&mut codec, &mut buf);
        assert_eq!(
            got,
            vec![Incoming::Frame(Frame::new(1, FrameKind::Eof, Bytes::new()))]
        );
    }

    #[test]
    fn encoder_refuses_oversized() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let frame = Frame::new(1, FrameKind::Data, vec![0u8; MAX_PAYLOAD + 1]);
        assert!(codec.encode(frame, &mut buf).is_err());
    }

    /// Hostile input: random bytes, fed in random-sized pieces, never panic the
    /// decoder and never make it hold more than one frame's worth of bytes.
    #[test]
    fn random_bytes_never_panic_or_grow_unbounded() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::new();
            for _ in 0..50 {
                let n = (next() % 4096) as usize;
                for _ in 0..n {
                    buf.put_u8(next() as u8);
                }
                while let Ok(Some(_)) = codec.decode(&mut buf) {}
                assert!(buf.len() <= HEADER_LEN + MAX_PAYLOAD + 4096);
            }
        }
    }

    #[test]
    fn resize_frame_round_trips() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let frame = Frame::json(5, FrameKind::Resize, &ResizeRequest { cols: 80, rows: 24 });
        codec.encode(frame.clone(), &mut buf).expect("encode");
        assert_eq!(buf[8], 10, "kind byte");
        let got = decode_all(&mut codec, &mut buf);
        assert_eq!(got, vec![Incoming::Frame(frame.clone())]);
        assert_eq!(
            frame.parse::<ResizeRequest>().expect("json"),
            ResizeRequest { cols: 80, rows: 24 }
        );
    }

    #[test]
    fn bad_json_payload_is_an_error() {
        let frame = Frame::new(1, FrameKind::Open, &b"{not json"[..]);
        assert!(frame.parse::<Request>().is_err());
    }
}
