//! arservice patch: a chunked request body reader whose every line is bounded (PATCHED.md).
//!
//! `chunked_transfer::Decoder` kept a chunk-size line in memory however long it was, took an
//! early end of the stream for the end of the body, and knew no trailers. This one refuses a
//! size or trailer line over [`MAX_LINE_BYTES`], more than [`MAX_TRAILERS`] trailer lines, and a
//! stream that ends inside the body (`InvalidData` and `UnexpectedEof`, whose messages say so).

use std::convert::TryFrom;
use std::io::{Error as IoError, ErrorKind, Read, Result as IoResult};

/// The longest chunk-size line (extensions included) or trailer line.
const MAX_LINE_BYTES: usize = 4096;

/// The most trailer lines after the last chunk.
const MAX_TRAILERS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk, with this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// The last chunk and the trailers were read.
    Done,
}

pub(crate) struct ChunkedReader<R> {
    source: R,
    state: State,
}

fn invalid(why: String) -> IoError {
    IoError::new(ErrorKind::InvalidData, why)
}

impl<R: Read> ChunkedReader<R> {
    pub(crate) fn new(source: R) -> ChunkedReader<R> {
        ChunkedReader {
            source,
            state: State::Size,
        }
    }

    fn byte(&mut self) -> IoResult<u8> {
        let mut byte = [0u8];
        loop {
            match self.source.read(&mut byte) {
                Ok(0) => {
                    return Err(IoError::new(
                        ErrorKind::UnexpectedEof,
                        "the chunked body ended before its last chunk",
                    ))
                }
                Ok(_) => return Ok(byte[0]),
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
        }
    }

    /// One line without its CRLF (a bare LF ends it too), at most [`MAX_LINE_BYTES`].
    fn line(&mut self, what: &str) -> IoResult<Vec<u8>> {
        let mut line = Vec::new();
        loop {
            match self.byte()? {
                b'\n' => {
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    return Ok(line);
                }
                byte => {
                    if line.len() >= MAX_LINE_BYTES {
                        return Err(invalid(format!(
                            "a {what} line of the chunked body is longer than {MAX_LINE_BYTES} bytes"
                        )));
                    }
                    line.push(byte);
                }
            }
        }
    }

    fn chunk_size(&mut self) -> IoResult<u64> {
        let line = self.line("chunk size")?;
        let size = line.split(|&byte| byte == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(size)
            .unwrap_or_default()
            .trim_matches([' ', '\t']);
        if size.is_empty() || size.len() > 15 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(format!(
                "invalid chunk size line {:?} in the chunked body",
                String::from_utf8_lossy(&line[..line.len().min(64)])
            )));
        }
        Ok(u64::from_str_radix(size, 16).expect("checked hex digits"))
    }
}

impl<R: Read> Read for ChunkedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                State::Done => return Ok(0),
                State::Size => match self.chunk_size()? {
                    0 => {
                        let mut trailers = 0;
                        while !self.line("trailer")?.is_empty() {
                            trailers += 1;
                            if trailers > MAX_TRAILERS {
                                return Err(invalid(format!(
                                    "more than {MAX_TRAILERS} trailer lines after the chunked body"
                                )));
                            }
                        }
                        self.state = State::Done;
                    }
                    size => self.state = State::Data(size),
                },
                State::Data(left) => {
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let read = self.source.read(&mut buf[..want])?;
                    if read == 0 {
                        return Err(IoError::new(
                            ErrorKind::UnexpectedEof,
                            "the chunked body ended inside a chunk",
                        ));
                    }
                    let left = left - read as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                    return Ok(read);
                }
                State::DataEnd => {
                    if !self.line("chunk end")?.is_empty() {
                        return Err(invalid("a chunk is longer than its size".into()));
                    }
                    self.state = State::Size;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ChunkedReader;
    use std::io::Read;

    fn decode(input: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        ChunkedReader::new(input).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn chunks_extensions_and_trailers() {
        assert_eq!(
            decode(b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nT: v\r\n\r\n").unwrap(),
            b"hello world"
        );
        assert_eq!(decode(b"0\r\n\r\n").unwrap(), b"");
    }

    #[test]
    fn everything_is_bounded_and_an_early_end_is_an_error() {
        let long = [b"1".repeat(5000), b"\r\n".to_vec()].concat();
        assert!(decode(&long)
            .unwrap_err()
            .to_string()
            .contains("longer than"));
        assert!(decode(b"zz\r\n")
            .unwrap_err()
            .to_string()
            .contains("chunk size"));
        assert!(decode(b"fffffffffffffffff\r\n").is_err());
        assert!(decode(b"5\r\nhel").is_err());
        assert!(decode(b"5\r\nhello").is_err());
        assert!(decode(b"2\r\nhello\r\n0\r\n\r\n").is_err());
        let trailers = [b"0\r\n".to_vec(), b"T: v\r\n".repeat(100), b"\r\n".to_vec()].concat();
        assert!(decode(&trailers).is_err());
    }
}
