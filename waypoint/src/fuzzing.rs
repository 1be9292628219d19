//! Entry points for the fuzz targets in `fuzz/` at the repository root (feature
//! `fuzzing`), also built into the unit tests, which replay every saved input under
//! `fuzz/regressions/<target>/`.

use crate::listener::upgrade::{Frames, Side, close_frame};

/// The WebSocket frame tracker that finds frame boundaries in spliced bytes (for the
/// drain's Close frames). The input is `[chunking seed][stream]`. Properties:
/// - every step consumes at least one byte of a non-empty read (the pump would spin
///   otherwise);
/// - the frames found do not depend on how the stream is cut into reads (all at once,
///   byte by byte, or in the sizes the seed picks);
/// - they agree with a whole-buffer parser written from RFC 6455 §5.2;
/// - the Close frames the waypoint injects parse as one Close frame each.
pub fn websocket_frames(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let whole = track(stream, |_| stream.len().max(1));
    let bytewise = track(stream, |_| 1);
    let mut state = u32::from(seed) | 1;
    let chunked = track(stream, |_| {
        // xorshift: reproducible read sizes from 1 to 64 bytes.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        usize::try_from(state % 64).unwrap_or(0) + 1
    });
    assert_eq!(
        whole, bytewise,
        "frames differ between one read and byte-sized reads"
    );
    assert_eq!(
        whole, chunked,
        "frames differ with reads cut by seed {seed}"
    );
    assert_eq!(
        whole,
        reference(stream),
        "the tracker disagrees with RFC 6455"
    );

    for side in [Side::ToClient, Side::ToServer] {
        let close = close_frame(side, u16::from_be_bytes([seed, seed]));
        let frames = reference(&close);
        assert_eq!(frames.len(), 1, "{close:?}");
        assert_eq!(frames[0], (frames[0].0, 0x8), "a Close frame");
        let mut f = Frames::default();
        let (used, _) = f.step(&close);
        let (rest, _) = f.step(&close[used..]);
        assert_eq!(used + rest, close.len());
        assert!(f.at_boundary(), "a whole Close frame ends at a boundary");
    }
}

/// Feeds `stream` to a tracker in reads of the sizes `next` gives; returns where each
/// frame's header ended and its opcode.
fn track(stream: &[u8], mut next: impl FnMut(usize) -> usize) -> Vec<(usize, u8)> {
    let mut frames = Frames::default();
    let mut found = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let end = (at + next(at)).min(stream.len());
        let mut read = &stream[at..end];
        while !read.is_empty() {
            let (used, opcode) = frames.step(read);
            assert!(
                used > 0 && used <= read.len(),
                "step used {used} of {}",
                read.len()
            );
            if let Some(op) = opcode {
                found.push((at + used, op));
            }
            at += used;
            read = &read[used..];
        }
    }
    found
}

/// Frame headers of a whole buffer (RFC 6455 §5.2): where each ends and its opcode.
fn reference(stream: &[u8]) -> Vec<(usize, u8)> {
    let mut found = Vec::new();
    let mut at = 0usize;
    loop {
        let (Some(&b0), Some(&b1)) = (stream.get(at), stream.get(at + 1)) else {
            return found;
        };
        let (ext, short) = match b1 & 0x7f {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(u64::from(n))),
        };
        let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
        let header = 2 + ext + mask;
        let Some(ext_bytes) = stream.get(at + 2..at + 2 + ext) else {
            return found;
        };
        if stream.len() < at + header {
            return found;
        }
        let len =
            short.unwrap_or_else(|| ext_bytes.iter().fold(0, |acc, b| acc << 8 | u64::from(*b)));
        found.push((at + header, b0 & 0x0f));
        let Some(next) = u64::try_from(at + header)
            .ok()
            .and_then(|h| h.checked_add(len))
            .and_then(|n| usize::try_from(n).ok())
        else {
            return found;
        };
        if next >= stream.len() {
            return found;
        }
        at = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_frames_regressions() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/regressions/websocket_frames");
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let data = std::fs::read(entry.path()).expect("a regression input is readable");
                let outcome = std::panic::catch_unwind(|| websocket_frames(&data));
                assert!(outcome.is_ok(), "{} fails again", entry.path().display());
            }
        }
        // A masked text frame "hi", a 300-byte binary frame (16-bit length), a ping.
        let mut stream = vec![
            3,
            0x81,
            0x82,
            1,
            2,
            3,
            4,
            b'h' ^ 1,
            b'i' ^ 2,
            0x82,
            126,
            1,
            44,
        ];
        stream.extend(std::iter::repeat_n(0, 300));
        stream.extend([0x89, 0]);
        websocket_frames(&stream);
        assert_eq!(reference(&stream[1..]).len(), 3);
    }
}
