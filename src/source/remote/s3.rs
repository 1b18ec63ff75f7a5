//! An object in an S3 bucket: GetObject with Range and If-Match, signed with SigV4 (or
//! unsigned, for public buckets, when no credentials are set).
//!
//! AWS itself is addressed virtual-host style (`BUCKET.s3.REGION.amazonaws.com`); a custom
//! endpoint (`AWS_ENDPOINT_URL`: MinIO, Ceph, a test server) path style
//! (`ENDPOINT/BUCKET/KEY`), which is what such servers expect.

use std::time::SystemTime;

use super::client::{Answer, HttpClient};
use super::credentials::AwsSettings;
use super::http::{check_bounds, check_not_changed, probe_length};
use super::retry::{self, Failure, RetryPolicy, SystemClock};
use super::sigv4::{self, SigningRequest, EMPTY_PAYLOAD_SHA256};
use super::url::{percent_encode, HttpUrl, S3Location};
use super::{ObjectStore, ObjectVersion, RemoteError, StoreConfig};

/// One S3 object.
#[derive(Debug)]
pub struct S3Store {
    client: HttpClient,
    location: S3Location,
    settings: AwsSettings,
    /// The object's URL (path encoded as S3 signs it).
    url: HttpUrl,
    retry: RetryPolicy,
}

impl S3Store {
    pub fn new(location: S3Location, config: &StoreConfig) -> Result<Self, RemoteError> {
        let settings = AwsSettings::from_env(&config.env)?;
        let key = percent_encode(&location.key, true);
        let url = match &settings.endpoint {
            Some(endpoint) => {
                let base = HttpUrl::parse(endpoint).map_err(|e| {
                    RemoteError::Refused(format!("AWS_ENDPOINT_URL {endpoint:?}: {e}"))
                })?;
                if base.userinfo.is_some() || base.query.is_some() {
                    return Err(RemoteError::Refused(
                        "AWS_ENDPOINT_URL must be scheme://host[:port][/path] only".into(),
                    ));
                }
                let prefix = base.path.trim_end_matches('/');
                base.with_path(&format!("{prefix}/{}/{key}", location.bucket))
            }
            None => {
                let region = &settings.region;
                // Dots in a bucket name break the TLS wildcard of virtual hosts.
                let virtual_host = location.bucket.len() <= 63
                    && !location.bucket.contains('.')
                    && location
                        .bucket
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                let text = if virtual_host {
                    format!(
                        "https://{}.s3.{region}.amazonaws.com/{key}",
                        location.bucket
                    )
                } else {
                    format!(
                        "https://s3.{region}.amazonaws.com/{}/{key}",
                        location.bucket
                    )
                };
                HttpUrl::parse(&text)
                    .map_err(|e| RemoteError::Refused(format!("s3://{}: {e}", location.bucket)))?
            }
        };
        Ok(S3Store {
            client: HttpClient::new(config)?,
            location,
            settings,
            url,
            retry: config.retry.clone(),
        })
    }

    /// One signed GET of the object with `headers`.
    fn get(&self, headers: &[(&str, &str)]) -> Result<Answer, Failure> {
        let all: Vec<(String, String)> = match &self.settings.credentials {
            Some(creds) => sigv4::sign(
                &SigningRequest {
                    method: "GET",
                    host: &self.url.authority(),
                    path: &self.url.path,
                    query: &[],
                    headers,
                    payload_sha256: EMPTY_PAYLOAD_SHA256,
                },
                creds,
                &self.settings.region,
                "s3",
                SystemTime::now(),
            ),
            None => headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let answer = self.client.send("GET", &self.url, &all)?;
        match answer.status {
            301 | 307 | 400 | 403 => Err(self.explain_refusal(answer)),
            _ => Ok(answer),
        }
    }

    /// The failure S3's refusals mean, with what to do about them.
    fn explain_refusal(&self, mut answer: Answer) -> Failure {
        let region = answer.header("x-amz-bucket-region").map(String::from);
        let status = answer.status;
        let detail = answer.error_detail();
        let what = format!("GET {}", self.describe());
        let hint = if let Some(region) = region.filter(|r| *r != self.settings.region) {
            format!("; the bucket is in {region}: set AWS_REGION={region}")
        } else if detail.contains("RequestTimeTooSkewed") {
            "; this machine's clock is off".into()
        } else if detail.contains("ExpiredToken") {
            "; the session token expired: renew AWS_SESSION_TOKEN".into()
        } else if detail.contains("SignatureDoesNotMatch") || detail.contains("InvalidAccessKeyId")
        {
            "; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)".into()
        } else if status == 403 && self.settings.credentials.is_none() {
            "; no AWS credentials are set, so the request was anonymous".into()
        } else {
            String::new()
        };
        if detail.contains("SlowDown") || detail.contains("RequestTimeout") {
            return Failure::retry(format!("{what}: {status}{detail}"));
        }
        Failure::refused(format!(
            "{what}: the server answered {status}{detail}{hint}"
        ))
    }
}

impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.location.bucket, self.location.key)
    }

    /// The request URL: the same bucket and key at another endpoint or region is another
    /// object.
    fn identity(&self) -> String {
        super::url::wire_url(&self.url)
    }

    fn version(&self) -> Result<ObjectVersion, RemoteError> {
        let what = format!("GET {}", self.describe());
        retry::run(&self.retry, &SystemClock, &what, || {
            let answer = self.get(&[("range", "bytes=0-0")])?;
            if !matches!(answer.status, 200 | 206 | 416) {
                return Err(answer.status_failure(&what));
            }
            let len = probe_length(&answer, &self.url)?;
            let etag = answer
                .header("etag")
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(String::from)
                .ok_or_else(|| Failure::retry(format!("{what}: the answer has no ETag")))?;
            answer.read_partial(0, &mut [0u8; 1], len)?;
            Ok(ObjectVersion {
                len,
                validator: etag,
            })
        })
    }

    fn read_range(
        &self,
        version: &ObjectVersion,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), RemoteError> {
        let Some(end) = check_bounds(version, offset, buf.len(), &self.describe())? else {
            return Ok(());
        };
        let range = format!("bytes={offset}-{end}");
        let what = format!("GET {} bytes {offset}-{end}", self.describe());
        retry::run(&self.retry, &SystemClock, &what, || {
            let answer = self.get(&[("range", &range), ("if-match", &version.validator)])?;
            check_not_changed(&answer, version)?;
            answer.read_partial(offset, buf, version.len)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::remote::Environment;

    fn store(bucket: &str, key: &str, env: Environment) -> S3Store {
        S3Store::new(
            S3Location {
                bucket: bucket.into(),
                key: key.into(),
            },
            &StoreConfig::new(env),
        )
        .unwrap()
    }

    #[test]
    fn aws_is_addressed_by_virtual_host_and_custom_endpoints_by_path() {
        let env = Environment::empty().with("AWS_REGION", "eu-central-1");
        let s = store("images", "dir/a b+c.sif", env.clone());
        assert_eq!(
            crate::source::remote::url::wire_url(&s.url),
            "https://images.s3.eu-central-1.amazonaws.com/dir/a%20b%2Bc.sif"
        );
        // Dots would break the TLS wildcard: path style.
        let s = store("my.images", "k", env.clone());
        assert_eq!(
            crate::source::remote::url::wire_url(&s.url),
            "https://s3.eu-central-1.amazonaws.com/my.images/k"
        );
        let s = store(
            "images",
            "k.sif",
            env.with("AWS_ENDPOINT_URL", "http://127.0.0.1:9000/prefix/"),
        );
        assert_eq!(
            crate::source::remote::url::wire_url(&s.url),
            "http://127.0.0.1:9000/prefix/images/k.sif"
        );
        assert_eq!(s.describe(), "s3://images/k.sif");
    }
}
