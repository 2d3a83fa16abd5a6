//! Just enough of the PostgreSQL frontend/backend protocol (version 3.0) to
//! ask a server `SELECT 1` over TCP: the startup message, trust
//! authentication, a simple query and its one row. Written for the bench,
//! which must time a query without starting a `psql` process per run.

use std::io::{Read, Write};

use anyhow::{Context, Result, bail};

/// Protocol version 3.0, as the startup message spells it.
const PROTOCOL_3_0: u32 = 3 << 16;

/// The query the probe sends, and the one value its row must hold.
pub const QUERY: &str = "SELECT 1";
const ANSWER: &[u8] = b"1";

/// The SQLSTATE a server answers with while it starts up or recovers
/// (`cannot_connect_now`): a fresh postmaster listens before it serves.
pub const CANNOT_CONNECT_NOW: &str = "57P03";

/// An `ErrorResponse` from the server, with the fields worth reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// `S`: ERROR, FATAL or PANIC (localised).
    pub severity: String,
    /// `C`: the SQLSTATE code.
    pub code: String,
    /// `M`: the primary message.
    pub message: String,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)
    }
}

impl std::error::Error for ServerError {}

/// One message from the server: its type byte and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Message {
    tag: u8,
    body: Vec<u8>,
}

/// The startup message: protocol 3.0, `user` and `database`.
pub fn startup_message(user: &str, database: &str) -> Vec<u8> {
    let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
    for (key, value) in [("user", user), ("database", database)] {
        body.extend_from_slice(key.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    // The length counts itself but no type byte: the startup message has none.
    let mut message = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    message.extend(body);
    message
}

/// A simple `Query` message of `sql`.
fn query_message(sql: &str) -> Vec<u8> {
    let mut message = vec![b'Q'];
    message.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    message.extend_from_slice(sql.as_bytes());
    message.push(0);
    message
}

/// `Terminate`: the backend exits at once instead of logging an
/// unexpected EOF.
const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// Reads the server's answers to a startup message (sent by the caller)
/// until it is ready for a query, sends [`QUERY`], and reads its row and
/// the next `ReadyForQuery`. `answered` is called the moment the row has
/// arrived (the bench's timestamp). A server error comes back as a
/// [`ServerError`] in the chain.
pub fn select_one(stream: &mut (impl Read + Write), answered: impl FnOnce()) -> Result<()> {
    wait_ready(stream).context("during startup")?;
    stream
        .write_all(&query_message(QUERY))
        .context("sending the query")?;
    let value = read_answer(stream, answered).with_context(|| format!("answering {QUERY:?}"))?;
    if value.as_deref() != Some(ANSWER) {
        bail!(
            "{QUERY:?} answered {:?}, expected {:?}",
            value.map(|v| String::from_utf8_lossy(&v).into_owned()),
            String::from_utf8_lossy(ANSWER)
        );
    }
    // Best effort: the answer is in, a server gone meanwhile is no failure.
    let _ = stream.write_all(&TERMINATE);
    Ok(())
}

/// Reads until `ReadyForQuery`, accepting only `AuthenticationOk` (the
/// bench's clusters trust local TCP clients).
fn wait_ready(stream: &mut impl Read) -> Result<()> {
    loop {
        let message = read_message(stream)?;
        match message.tag {
            b'R' => {
                let code = be_u32(&message.body, 0).context("a short Authentication message")?;
                if code != 0 {
                    bail!(
                        "the server asks for authentication (method {code}); the bench's \
                         cluster trusts its clients (initdb --auth=trust)"
                    );
                }
            }
            // ParameterStatus, BackendKeyData, NoticeResponse: nothing to do.
            b'S' | b'K' | b'N' => {}
            b'Z' => return Ok(()),
            b'E' => return Err(server_error(&message.body).into()),
            other => bail!("unexpected message {:?} during startup", char::from(other)),
        }
    }
}

/// Reads a simple query's answer up to `ReadyForQuery`: the first column
/// of its first row (`None` for no row or a NULL).
fn read_answer(stream: &mut impl Read, answered: impl FnOnce()) -> Result<Option<Vec<u8>>> {
    let mut answered = Some(answered);
    let mut value = None;
    let mut error = None;
    loop {
        let message = read_message(stream)?;
        match message.tag {
            b'D' => {
                if let Some(answered) = answered.take() {
                    answered();
                    value = first_column(&message.body)?;
                }
            }
            // RowDescription, CommandComplete, NoticeResponse,
            // ParameterStatus (the server may send it at any time).
            b'T' | b'C' | b'N' | b'S' => {}
            // An error is followed by ReadyForQuery too; keep the first.
            b'E' => {
                error.get_or_insert_with(|| server_error(&message.body));
            }
            b'Z' => break,
            other => bail!("unexpected message {:?} in the answer", char::from(other)),
        }
    }
    match error {
        Some(error) => Err(error.into()),
        None => Ok(value),
    }
}

/// Reads one message: a type byte, a length that counts itself, the body.
fn read_message(stream: &mut impl Read) -> Result<Message> {
    let mut header = [0u8; 5];
    stream
        .read_exact(&mut header)
        .context("reading a message from the server")?;
    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    // A bogus length (not a PostgreSQL server) must not make us allocate a lot.
    if !(4..=1 << 20).contains(&length) {
        bail!(
            "message {:?} has a length of {length}: not the PostgreSQL protocol",
            char::from(header[0])
        );
    }
    let mut body = vec![0u8; length - 4];
    stream.read_exact(&mut body).with_context(|| {
        format!(
            "reading the {} bytes of message {:?}",
            length - 4,
            char::from(header[0])
        )
    })?;
    Ok(Message {
        tag: header[0],
        body,
    })
}

/// The first column of a `DataRow` body: a count of columns, then per
/// column a length (-1 for NULL) and its bytes.
fn first_column(body: &[u8]) -> Result<Option<Vec<u8>>> {
    let columns = body
        .get(..2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .context("a short DataRow")?;
    if columns == 0 {
        return Ok(None);
    }
    let length = be_u32(body, 2).context("a short DataRow")? as i32;
    if length < 0 {
        return Ok(None);
    }
    body.get(6..6 + length as usize)
        .map(|value| Some(value.to_vec()))
        .context("a DataRow shorter than its column")
}

/// An `ErrorResponse` body: fields of a type byte and a NUL-terminated
/// string, ended by a NUL.
fn server_error(body: &[u8]) -> ServerError {
    let mut error = ServerError {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
    };
    for field in body.split(|&b| b == 0) {
        let Some((&kind, text)) = field.split_first() else {
            continue;
        };
        let text = String::from_utf8_lossy(text).into_owned();
        match kind {
            b'S' => error.severity = text,
            b'C' => error.code = text,
            b'M' => error.message = text,
            _ => {}
        }
    }
    error
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A server message of type `tag` with `body`.
    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn error_body(code: &str, text: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for (kind, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', text)] {
            body.push(kind);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        body
    }

    /// What a server answers a trusted client and `SELECT 1`, as bytes.
    fn canned_session(value: &[u8]) -> Vec<u8> {
        let mut bytes = message(b'R', &0u32.to_be_bytes());
        bytes.extend(message(b'S', b"server_version\x0015.10\x00"));
        bytes.extend(message(b'S', b"client_encoding\x00UTF8\x00"));
        bytes.extend(message(b'K', &[0, 0, 0x30, 0x39, 1, 2, 3, 4]));
        bytes.extend(message(b'Z', b"I"));
        let mut description = 1u16.to_be_bytes().to_vec();
        description.extend_from_slice(b"?column?\x00");
        description.extend_from_slice(&[0; 18]);
        bytes.extend(message(b'T', &description));
        let mut row = 1u16.to_be_bytes().to_vec();
        row.extend_from_slice(&(value.len() as u32).to_be_bytes());
        row.extend_from_slice(value);
        bytes.extend(message(b'D', &row));
        bytes.extend(message(b'C', b"SELECT 1\x00"));
        bytes.extend(message(b'Z', b"I"));
        bytes
    }

    /// A stream that answers with canned bytes and keeps what is written.
    struct Canned {
        answers: Cursor<Vec<u8>>,
        sent: Vec<u8>,
    }

    impl Canned {
        fn new(answers: Vec<u8>) -> Self {
            Self {
                answers: Cursor::new(answers),
                sent: Vec::new(),
            }
        }
    }

    impl Read for Canned {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.answers.read(buf)
        }
    }

    impl Write for Canned {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.sent.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_startup_message_asks_for_protocol_3_with_user_and_database() {
        let message = startup_message("postgres", "postgres");
        let expected: &[u8] = b"\x00\x00\x00\x29\x00\x03\x00\x00\
            user\x00postgres\x00database\x00postgres\x00\x00";
        assert_eq!(message, expected);
    }

    #[test]
    fn a_canned_session_answers_select_1() {
        let mut stream = Canned::new(canned_session(b"1"));
        let mut answered = false;
        select_one(&mut stream, || answered = true).expect("the canned answer");
        assert!(answered);
        let mut sent = query_message(QUERY);
        sent.extend_from_slice(&TERMINATE);
        assert_eq!(stream.sent, sent);
        assert_eq!(&stream.sent[..5], b"Q\x00\x00\x00\x0d");
    }

    #[test]
    fn a_wrong_value_is_an_error() {
        let mut stream = Canned::new(canned_session(b"2"));
        let err = select_one(&mut stream, || {}).unwrap_err();
        assert!(
            format!("{err:#}").contains("answered Some(\"2\")"),
            "{err:#}"
        );
    }

    #[test]
    fn an_error_response_names_its_code_and_message() {
        let mut bytes = message(
            b'E',
            &error_body(CANNOT_CONNECT_NOW, "the database system is starting up"),
        );
        bytes.extend(message(b'Z', b"I"));
        let mut stream = Canned::new(bytes);
        let err = select_one(&mut stream, || {}).unwrap_err();
        let server = err
            .downcast_ref::<ServerError>()
            .expect("a ServerError in the chain");
        assert_eq!(server.code, CANNOT_CONNECT_NOW);
        assert_eq!(
            format!("{err:#}"),
            "during startup: FATAL 57P03: the database system is starting up"
        );
    }

    #[test]
    fn an_error_in_the_answer_is_reported_after_ready_for_query() {
        let mut bytes = canned_session(b"1");
        // Cut the session after the first ReadyForQuery and answer with an error.
        let ready = bytes
            .windows(6)
            .position(|w| w == b"Z\x00\x00\x00\x05I")
            .unwrap()
            + 6;
        bytes.truncate(ready);
        bytes.extend(message(b'E', &error_body("42601", "syntax error")));
        bytes.extend(message(b'Z', b"I"));
        let err = select_one(&mut Canned::new(bytes), || {}).unwrap_err();
        assert!(
            format!("{err:#}").contains("FATAL 42601: syntax error"),
            "{err:#}"
        );
    }

    #[test]
    fn other_authentication_methods_are_refused() {
        // AuthenticationMD5Password with its salt.
        let bytes = message(b'R', &[0, 0, 0, 5, 1, 2, 3, 4]);
        let err = select_one(&mut Canned::new(bytes), || {}).unwrap_err();
        assert!(format!("{err:#}").contains("method 5"), "{err:#}");
    }

    #[test]
    fn a_stream_that_is_not_postgres_is_refused() {
        let err = select_one(&mut Canned::new(b"HTTP/1.1 400 Bad".to_vec()), || {}).unwrap_err();
        assert!(
            format!("{err:#}").contains("not the PostgreSQL protocol"),
            "{err:#}"
        );
    }

    #[test]
    fn a_null_or_missing_row_is_no_value() {
        assert_eq!(first_column(&[0, 1, 0xff, 0xff, 0xff, 0xff]).unwrap(), None);
        assert_eq!(first_column(&[0, 0]).unwrap(), None);
        assert!(first_column(&[0, 1, 0, 0, 0, 9, b'1']).is_err());
    }
}
