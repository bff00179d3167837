//! berth-pingora-floor: the least a Pingora HTTP/1.1 server can do per request, to
//! measure what Pingora itself costs beside nginx and berth.
//!
//! It answers every request with one fixed body (a manifest file given on the command
//! line) and the headers berth sends with a manifest, on keep-alive connections, with the
//! same listener settings as berth (no read buffer, a 16 KiB write buffer). No routing,
//! no cache, no access log, no metrics: what berth spends above this is berth's own.
//!
//!   berth-pingora-floor 127.0.0.1:5001 manifest.json
//!
//! Benchmark tool only; not part of berth.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::configuration::ServerConf;
use pingora::server::{Server, ShutdownWatch};
use pingora::services::listening::Service;

struct Floor {
    body: Bytes,
    digest: HeaderValue,
}

#[async_trait]
impl HttpServerApp for Floor {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        _shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            _ => return None,
        }
        session.set_keepalive(Some(60));
        let mut headers = HeaderMap::with_capacity(8);
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
        );
        headers.insert(
            HeaderName::from_static("docker-content-digest"),
            self.digest.clone(),
        );
        headers.insert(
            http::header::CONTENT_LENGTH,
            HeaderValue::from(self.body.len()),
        );
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.headers = headers;
        let resp = Box::new(ResponseHeader::from(parts));
        if session.write_response_header(resp).await.is_err()
            || session
                .write_response_body(self.body.clone(), true)
                .await
                .is_err()
        {
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(Some(stream)) => Some(ReusedHttpStream::from_reusable_stream(stream, settings)),
            _ => None,
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, body] = &args[..] else {
        eprintln!("usage: berth-pingora-floor LISTEN_ADDR BODY_FILE");
        std::process::exit(2);
    };
    let body = match std::fs::read(body) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            eprintln!("berth-pingora-floor: {body}: {e}");
            std::process::exit(2);
        }
    };
    let digest = {
        use sha2::Digest as _;
        let hex: String = sha2::Sha256::digest(&body)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        HeaderValue::from_str(&format!("sha256:{hex}")).expect("a valid header value")
    };
    let conf = ServerConf {
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        // Stop at once on SIGTERM (Pingora's default grace is minutes).
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        pid_file: std::env::temp_dir()
            .join(format!("berth-pingora-floor-{}.pid", std::process::id()))
            .display()
            .to_string(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    let mut service = Service::new("floor".to_owned(), Floor { body, digest });
    service.add_listener(
        pingora::listeners::ListenerConfig::tcp(listen)
            .l4_buffer(L4BufferSettings::new(0, 16 << 10)),
    );
    server.add_service(service);
    server.run_forever();
}
