//! Checks against a guest agent running in a real VM (PID 1, booted from the minimal
//! template). Ignored by default; run with the guest's address, e.g. from inside the
//! netns that `images/boot-raw.sh --net --keep` created:
//!
//! ```sh
//! ip netns exec NS env HEARTH_GUEST_URL=http://169.254.0.21:49983 \
//!     cargo test -p hearth-guest --test vm -- --ignored
//! ```
//!
//! The test initialises the guest with the access token in `HEARTH_GUEST_TOKEN` (default
//! `vm-test-token`); a guest already initialised must have that token.

use base64::Engine as _;
use connectrpc::client::{CallOptions, ClientConfig, HttpClient};
use hearth_proto::process::{process_event, ProcessClient, ProcessConfig, StartRequest};

fn url() -> String {
    std::env::var("HEARTH_GUEST_URL").expect("set HEARTH_GUEST_URL to the guest agent's URL")
}

fn token() -> String {
    std::env::var("HEARTH_GUEST_TOKEN").unwrap_or_else(|_| "vm-test-token".into())
}

/// A client that sends the access token on every request.
fn http_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        "x-access-token",
        token().parse().expect("token is a valid header value"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client")
}

async fn exec(user: Option<&str>, cmd: &str, args: &[&str]) -> (Vec<u8>, i32) {
    let uri: http::Uri = url().parse().expect("uri");
    let client = ProcessClient::new(
        HttpClient::plaintext(),
        ClientConfig::new(uri).with_default_header("x-access-token", token()),
    );
    let mut opts = CallOptions::default();
    if let Some(u) = user {
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:"))
        );
        opts = opts.with_header(
            http::header::AUTHORIZATION,
            auth.parse::<http::HeaderValue>().expect("header"),
        );
    }
    let req = StartRequest {
        process: buffa::MessageField::some(ProcessConfig {
            cmd: cmd.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut s = client.start_with_options(req, opts).await.expect("start");
    let (mut out, mut code) = (Vec::new(), None);
    while let Some(m) = s.message().await.expect("message") {
        match m
            .to_owned_message()
            .event
            .as_option()
            .and_then(|e| e.event.clone())
        {
            Some(process_event::Event::Data(d)) => {
                if let Some(process_event::data_event::Output::Stdout(b)) = &d.output {
                    out.extend_from_slice(b);
                }
            }
            Some(process_event::Event::End(e)) => code = Some(e.exit_code),
            _ => {}
        }
    }
    (out, code.expect("end event"))
}

#[tokio::test]
#[ignore = "needs a booted guest: HEARTH_GUEST_URL"]
async fn guest_vm_answers() {
    let http = http_client();
    let health = http
        .get(format!("{}/health", url()))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 204);
    let init = http
        .post(format!("{}/init", url()))
        .json(&serde_json::json!({"accessToken": token()}))
        .send()
        .await
        .expect("init");
    assert_eq!(init.status(), 204);
    let anon = reqwest::Client::new()
        .get(format!("{}/envs", url()))
        .send()
        .await
        .expect("envs");
    assert_eq!(anon.status(), 401);

    let (out, code) = exec(None, "uname", &["-r"]).await;
    assert_eq!(code, 0);
    let release = String::from_utf8_lossy(&out).trim().to_owned();
    eprintln!("guest kernel: {release}");
    assert!(release.ends_with("-cloud-amd64"), "{release}");

    let (out, _) = exec(Some("user"), "sh", &["-c", "id -u; pwd"]).await;
    assert_eq!(String::from_utf8_lossy(&out), "1000\n/home/user\n");

    let (out, _) = exec(
        None,
        "sh",
        &[
            "-c",
            "hostname; cat /proc/mounts | cut -d' ' -f2 | sort | tr '\\n' ' '",
        ],
    )
    .await;
    eprintln!("guest: {}", String::from_utf8_lossy(&out));

    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let up = http
        .post(format!("{}/files?path=data.bin&username=user", url()))
        .body(data.clone())
        .send()
        .await
        .expect("upload");
    assert_eq!(up.status(), 200);
    let (out, _) = exec(None, "sh", &["-c", "stat -c '%U %s' /home/user/data.bin"]).await;
    assert_eq!(String::from_utf8_lossy(&out), "user 2000000\n");
    let down = http
        .get(format!("{}/files?path=/home/user/data.bin", url()))
        .send()
        .await
        .expect("download");
    assert!(down.bytes().await.expect("bytes").as_ref() == data.as_slice());
}
