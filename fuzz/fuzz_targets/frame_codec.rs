//! Feeds arbitrary bytes (as from a hostile guest or host) to the frame decoder,
//! then parses every decoded payload as each control message type.
#![no_main]

use bytes::BytesMut;
use hearth_proto::{ErrorReply, ExitStatus, FrameCodec, Hello, Incoming, Reply, Request};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = FrameCodec::default();
    // Split the input in two reads to exercise partial frames.
    let split = data.first().map(|b| *b as usize % (data.len() + 1)).unwrap_or(0);
    let mut buf = BytesMut::new();
    for chunk in [&data[..split], &data[split..]] {
        buf.extend_from_slice(chunk);
        while let Ok(Some(item)) = codec.decode(&mut buf) {
            if let Incoming::Frame(frame) = item {
                let _ = frame.parse::<Request>();
                let _ = frame.parse::<Reply>();
                let _ = frame.parse::<Hello>();
                let _ = frame.parse::<ExitStatus>();
                let _ = frame.parse::<ErrorReply>();
            }
        }
    }
});
