//! AWS Signature Version 4 for the few requests sifuse sends to S3 (GET with a payload-less
//! body), checked against AWS's published examples.

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::url::percent_encode;

/// SHA-256 of the empty payload, which every GET carries.
pub const EMPTY_PAYLOAD_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Access key, secret and (for temporary credentials) session token.
#[derive(Clone, PartialEq, Eq)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for AwsCredentials {
    /// Names the key, never the secret or the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<hidden>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<hidden>"),
            )
            .finish()
    }
}

/// One request to sign.
pub struct SigningRequest<'a> {
    pub method: &'a str,
    /// Host header value (`host` or `host:port`).
    pub host: &'a str,
    /// The path as sent (already URI-encoded once, as S3 wants it).
    pub path: &'a str,
    /// Query parameters, not encoded.
    pub query: &'a [(&'a str, &'a str)],
    /// Headers to sign besides `host`, `x-amz-date`, `x-amz-content-sha256` and
    /// `x-amz-security-token`, which [`sign`] adds.
    pub headers: &'a [(&'a str, &'a str)],
    /// Hex SHA-256 of the payload, or `UNSIGNED-PAYLOAD`.
    pub payload_sha256: &'a str,
}

/// The headers to send: every header of the request plus the signature's.
pub fn sign(
    req: &SigningRequest<'_>,
    creds: &AwsCredentials,
    region: &str,
    service: &str,
    time: SystemTime,
) -> Vec<(String, String)> {
    let amz_date = amz_date(time);
    let date = &amz_date[..8];

    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    headers.push(("host".into(), req.host.into()));
    headers.push(("x-amz-date".into(), amz_date.clone()));
    if service == "s3" {
        headers.push(("x-amz-content-sha256".into(), req.payload_sha256.into()));
    }
    if let Some(token) = &creds.session_token {
        headers.push(("x-amz-security-token".into(), token.clone()));
    }
    headers.sort();

    let mut query: Vec<(String, String)> = req
        .query
        .iter()
        .map(|(k, v)| (percent_encode(k, false), percent_encode(v, false)))
        .collect();
    query.sort();
    let canonical_query = query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed_headers = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical_request = format!(
        "{}\n{}\n{canonical_query}\n{canonical_headers}\n{signed_headers}\n{}",
        req.method, req.path, req.payload_sha256
    );
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let key = signing_key(&creds.secret_access_key, date, region, service);
    let signature = hex(&hmac(&key, string_to_sign.as_bytes()));
    headers.push((
        "authorization".into(),
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            creds.access_key_id
        ),
    ));
    // `host` goes in the request line's connection, not as a header we set.
    headers.retain(|(k, _)| k != "host");
    headers
}

/// The key derived from the secret for one day, region and service.
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> Vec<u8> {
    let k = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k = hmac(&k, region.as_bytes());
    let k = hmac(&k, service.as_bytes());
    hmac(&k, b"aws4_request")
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `YYYYMMDDTHHMMSSZ` in UTC.
pub fn amz_date(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day): Howard Hinnant's
/// `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// 2015-08-30T12:36:00Z, the time of AWS's SigV4 test suite.
    const SUITE_TIME: u64 = 1_440_938_160;

    fn suite_credentials() -> AwsCredentials {
        AwsCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }
    }

    fn authorization(headers: &[(String, String)]) -> &str {
        &headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .unwrap()
            .1
    }

    #[test]
    fn dates_are_formatted_in_utc() {
        assert_eq!(amz_date(at(SUITE_TIME)), "20150830T123600Z");
        assert_eq!(amz_date(at(1_369_353_600)), "20130524T000000Z");
        assert_eq!(amz_date(at(0)), "19700101T000000Z");
        assert_eq!(amz_date(at(951_782_400)), "20000229T000000Z");
        assert_eq!(amz_date(at(4_102_444_799)), "20991231T235959Z");
    }

    /// AWS's example of deriving a signing key (SigV4 documentation).
    #[test]
    fn the_signing_key_matches_the_aws_example() {
        let key = signing_key(
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "20150830",
            "us-east-1",
            "iam",
        );
        assert_eq!(
            hex(&key),
            "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"
        );
    }

    /// `get-vanilla` of AWS's SigV4 test suite.
    #[test]
    fn get_vanilla() {
        let headers = sign(
            &SigningRequest {
                method: "GET",
                host: "example.amazonaws.com",
                path: "/",
                query: &[],
                headers: &[],
                payload_sha256: EMPTY_PAYLOAD_SHA256,
            },
            &suite_credentials(),
            "us-east-1",
            "service",
            at(SUITE_TIME),
        );
        assert_eq!(
            authorization(&headers),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }

    /// `get-vanilla-query-order-key-case` of AWS's SigV4 test suite: parameters are sorted.
    #[test]
    fn get_vanilla_query_order() {
        let headers = sign(
            &SigningRequest {
                method: "GET",
                host: "example.amazonaws.com",
                path: "/",
                query: &[("Param2", "value2"), ("Param1", "value1")],
                headers: &[],
                payload_sha256: EMPTY_PAYLOAD_SHA256,
            },
            &suite_credentials(),
            "us-east-1",
            "service",
            at(SUITE_TIME),
        );
        assert!(authorization(&headers).ends_with(
            "Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
        ));
    }

    /// The GetObject example of the S3 API reference ("Signature Calculations for the
    /// Authorization Header: Transferring Payload in a Single Chunk"): a Range GET.
    #[test]
    fn s3_get_object_with_range() {
        let headers = sign(
            &SigningRequest {
                method: "GET",
                host: "examplebucket.s3.amazonaws.com",
                path: "/test.txt",
                query: &[],
                headers: &[("Range", "bytes=0-9")],
                payload_sha256: EMPTY_PAYLOAD_SHA256,
            },
            &AwsCredentials {
                access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
                secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
                session_token: None,
            },
            "us-east-1",
            "s3",
            at(1_369_353_600),
        );
        assert_eq!(
            authorization(&headers),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
        let names: Vec<_> = headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "range",
                "x-amz-content-sha256",
                "x-amz-date",
                "authorization"
            ]
        );
    }

    /// A key with characters S3 wants encoded (once: S3 does not double-encode paths), signed
    /// as botocore's S3SigV4Auth signs it.
    #[test]
    fn s3_keys_with_reserved_characters() {
        let path = format!("/{}", percent_encode("dir/a b+c=dé.sif", true));
        assert_eq!(path, "/dir/a%20b%2Bc%3Dd%C3%A9.sif");
        let headers = sign(
            &SigningRequest {
                method: "GET",
                host: "examplebucket.s3.amazonaws.com",
                path: &path,
                query: &[],
                headers: &[("Range", "bytes=0-9")],
                payload_sha256: EMPTY_PAYLOAD_SHA256,
            },
            &AwsCredentials {
                access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
                secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
                session_token: None,
            },
            "us-east-1",
            "s3",
            at(1_369_353_600),
        );
        assert!(authorization(&headers).ends_with(
            "Signature=267cb99b93c89e382262229994c1a16b5fecd7db59db2f0bb5682d28b46be2e7"
        ));
    }

    #[test]
    fn a_session_token_is_sent_and_signed_but_never_shown() {
        let creds = AwsCredentials {
            session_token: Some("TOKEN/with+chars".into()),
            ..suite_credentials()
        };
        let headers = sign(
            &SigningRequest {
                method: "GET",
                host: "h",
                path: "/b/k",
                query: &[],
                headers: &[],
                payload_sha256: EMPTY_PAYLOAD_SHA256,
            },
            &creds,
            "us-east-1",
            "s3",
            at(SUITE_TIME),
        );
        assert!(headers
            .iter()
            .any(|(k, v)| k == "x-amz-security-token" && v == "TOKEN/with+chars"));
        assert!(authorization(&headers)
            .contains("SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token,"));
        let shown = format!("{creds:?}");
        assert!(
            !shown.contains("TOKEN") && !shown.contains("EXAMPLEKEY"),
            "{shown}"
        );
    }
}
