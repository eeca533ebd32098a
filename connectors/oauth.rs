//! API sessions: the access token a CRM sink sends, obtained by the grant its file declares
//! (a static private-app token, an OAuth refresh token, a Salesforce JWT bearer assertion or
//! client credentials), cached, and replaced once when the API says it expired.

use crate::config::{CrmAuth, Secret};
use crate::error::{Error, Result};
use serde_json::Value as Json;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::Mutex;

/// How a sink obtains its access token.
pub enum Grant {
    /// A token that does not expire (HubSpot private apps).
    Static(Secret),
    /// `grant_type=refresh_token` at `{url}` (HubSpot OAuth apps).
    RefreshToken { url: String, client_id: String, client_secret: Secret, refresh_token: Secret },
    /// A signed JWT bearer assertion at `{url}` (Salesforce server-to-server; no refresh token
    /// is issued, so every new session signs a new assertion).
    JwtBearer {
        url: String,
        client_id: String,
        username: String,
        key: Box<jsonwebtoken::EncodingKey>,
        audience: String,
    },
    /// `grant_type=client_credentials` at `{url}` (Salesforce, My Domain host).
    ClientCredentials { url: String, client_id: String, client_secret: Secret },
}

/// An access token and where to use it.
#[derive(Clone)]
pub struct Token {
    pub access: Secret,
    /// The instance the API lives on (Salesforce's `instance_url`), if the grant names one.
    pub instance_url: Option<String>,
    /// Which session this is, so two callers that both saw it expire replace it once.
    generation: u64,
}

/// A cached session.
pub struct Session {
    http: reqwest::Client,
    grant: Grant,
    current: Mutex<Option<Token>>,
}

impl Session {
    pub fn new(http: reqwest::Client, grant: Grant) -> Self {
        Self { http, grant, current: Mutex::new(None) }
    }

    /// The current token, obtained on first use.
    pub async fn token(&self) -> Result<Token> {
        let mut current = self.current.lock().await;
        if let Some(t) = &*current {
            return Ok(t.clone());
        }
        let t = self.obtain(1).await?;
        *current = Some(t.clone());
        Ok(t)
    }

    /// Replaces `stale` (the API refused it) with a new token, unless another caller already did.
    pub async fn renew(&self, stale: &Token) -> Result<Token> {
        let mut current = self.current.lock().await;
        if let Some(t) = current.as_ref().filter(|t| t.generation != stale.generation) {
            return Ok(t.clone());
        }
        if matches!(self.grant, Grant::Static(_)) {
            return Err(Error::config(
                "the API refused the token (expired or revoked): replace it in the pipeline file",
            ));
        }
        tracing::info!("access token expired; obtaining a new one");
        let t = self.obtain(stale.generation + 1).await?;
        *current = Some(t.clone());
        Ok(t)
    }

    async fn obtain(&self, generation: u64) -> Result<Token> {
        let (url, form): (&str, Vec<(&str, String)>) = match &self.grant {
            Grant::Static(token) => return Ok(Token { access: token.clone(), instance_url: None, generation }),
            Grant::RefreshToken { url, client_id, client_secret, refresh_token } => (
                url,
                vec![
                    ("grant_type", "refresh_token".into()),
                    ("client_id", client_id.clone()),
                    ("client_secret", client_secret.expose().into()),
                    ("refresh_token", refresh_token.expose().into()),
                ],
            ),
            Grant::JwtBearer { url, client_id, username, key, audience } => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                // Salesforce accepts assertions that expire within 3 minutes.
                let claims = serde_json::json!({"iss": client_id, "sub": username, "aud": audience, "exp": now + 170});
                let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
                let assertion = jsonwebtoken::encode(&header, &claims, key)
                    .map_err(|e| Error::config(format!("signing the JWT assertion: {e}")))?;
                (
                    url,
                    vec![
                        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer".into()),
                        ("assertion", assertion),
                    ],
                )
            }
            Grant::ClientCredentials { url, client_id, client_secret } => (
                url,
                vec![
                    ("grant_type", "client_credentials".into()),
                    ("client_id", client_id.clone()),
                    ("client_secret", client_secret.expose().into()),
                ],
            ),
        };
        let response = self
            .http
            .post(url)
            .form(&form)
            .send()
            .await
            .map_err(|e| Error::retryable(format!("token request to {url}"), e))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| Error::retryable(format!("token request to {url}"), e))?;
        let body: Json = serde_json::from_str(&text).unwrap_or(Json::Null);
        match status {
            200 => {
                let access = body["access_token"].as_str().ok_or_else(|| {
                    Error::permanent(format!("token request to {url}"), "no access_token in the answer")
                })?;
                let instance_url = body["instance_url"].as_str().map(|u| u.trim_end_matches('/').to_string());
                Ok(Token { access: Secret::new(access), instance_url, generation })
            }
            400 | 401 | 403 => {
                let what = body["error"].as_str().or(body["status"].as_str()).unwrap_or("refused");
                let why = body["error_description"].as_str().or(body["message"].as_str()).unwrap_or(&text);
                Err(Error::config(format!(
                    "token request to {url} refused ({status} {what}: {why}): check the app's credentials in the pipeline file"
                )))
            }
            _ => Err(Error::retryable(format!("token request to {url}"), format!("{status}: {text}"))),
        }
    }
}

/// Reads a PEM RSA private key for JWT signing.
pub fn rsa_key(pem: &Secret) -> std::result::Result<jsonwebtoken::EncodingKey, String> {
    jsonwebtoken::EncodingKey::from_rsa_pem(pem.expose().as_bytes())
        .map_err(|e| format!("not an RSA private key in PEM: {e}"))
}

impl CrmAuth {
    /// The grant for this sign-in at `token_url` (the API's token endpoint).
    pub fn grant(&self, token_url: &str) -> Result<Grant> {
        let url = token_url.to_string();
        Ok(match self {
            CrmAuth::Token(t) => Grant::Static(t.clone()),
            CrmAuth::RefreshToken { client_id, client_secret, refresh_token } => Grant::RefreshToken {
                url,
                client_id: client_id.clone(),
                client_secret: client_secret.clone(),
                refresh_token: refresh_token.clone(),
            },
            CrmAuth::Jwt { client_id, username, private_key, audience } => Grant::JwtBearer {
                url,
                client_id: client_id.clone(),
                username: username.clone(),
                key: Box::new(rsa_key(private_key).map_err(|e| Error::config(format!("auth.private_key: {e}")))?),
                audience: audience.clone(),
            },
            CrmAuth::ClientCredentials { client_id, client_secret } => {
                Grant::ClientCredentials { url, client_id: client_id.clone(), client_secret: client_secret.clone() }
            }
        })
    }

    /// Identifies the account at API host `url` signed in to, without revealing a secret: sinks
    /// with the same account share one rate budget and one daily quota.
    pub fn account(&self, url: &str) -> String {
        use sha2::Digest;
        let material = match self {
            CrmAuth::Token(t) => t.expose().to_string(),
            CrmAuth::RefreshToken { client_id, refresh_token, .. } => format!("{client_id}|{}", refresh_token.expose()),
            CrmAuth::Jwt { client_id, username, .. } => format!("{client_id}|{username}"),
            CrmAuth::ClientCredentials { client_id, .. } => client_id.clone(),
        };
        format!("{url}|{}", hex::encode(&sha2::Sha256::digest(material.as_bytes())[..8]))
    }
}
