//! Validation of CRM sinks (HubSpot, Salesforce): the API host, how sluice signs in, the object,
//! the external key, and the account's limits. Private keys are parsed here, so a bad PEM fails
//! at `sluice validate` rather than at the first write.

use super::mapped::{batch, mapping, no_parquet_keys};
use super::pipeline::*;
use super::raw::*;
use super::secret::Secret;
use super::validate::{only_for, sink_name, Ctx};
use super::ConfigError;
use crate::event::TableId;
use std::time::Duration;

/// The API host: https, or plain http on loopback (an emulator).
fn api_url(cx: &Ctx, name: &str, raw: &RawSink, example: &str) -> Result<String, ConfigError> {
    let url = cx.resolve("url", &raw.url)?.trim_end_matches('/').to_string();
    if !(url.starts_with("https://") || url.starts_with("http://127.0.0.1") || url.starts_with("http://localhost")) {
        return Err(cx.err(
            &raw.url,
            format!("sink {name}: url `{url}` is neither https:// nor a loopback http:// address"),
            format!("use {example} (or an emulator on http://127.0.0.1:PORT)"),
        ));
    }
    Ok(url)
}

fn object(cx: &Ctx, name: &str, kind: &str, raw: &RawSink, example: &str) -> Result<String, ConfigError> {
    match &raw.object {
        Some(o) if !o.value.trim().is_empty() => Ok(o.value.trim().to_string()),
        _ => Err(cx.err(
            &raw.name,
            format!("sink {name}: a {kind} sink needs `object:`"),
            format!("add e.g. `object: {example}`"),
        )),
    }
}

/// Only `source_wins`: the CRM sinks do not read the target's records back yet.
fn source_wins_only(cx: &Ctx, name: &str, kind: &str, raw: &RawSink) -> Result<(), ConfigError> {
    match &raw.conflict {
        Some(c) if c.strategy.value.trim() != "source_wins" => Err(cx.err(
            &c.strategy,
            format!("sink {name}: conflict strategy `{}` is not supported for {kind} sinks yet", c.strategy.value),
            "use `source_wins` (or remove `conflict:`)",
        )),
        _ => Ok(()),
    }
}

fn limits(cx: &Ctx, raw: &RawSink, defaults: AccountLimits, kind: &str) -> Result<AccountLimits, ConfigError> {
    let mut rate = defaults;
    let Some(r) = &raw.rate else { return Ok(rate) };
    if let Some(n) = &r.ten_second_max {
        if kind == "salesforce" {
            return Err(cx.err(
                n,
                "rate.ten_second_max: Salesforce has no per-second limit, only the daily allocation",
                "remove it; `rate.daily_max` and `rate.park_probe` apply",
            ));
        }
        if n.value == 0 || n.value > u32::MAX as u64 {
            return Err(cx.err(
                n,
                "rate.ten_second_max: must be at least 1",
                "use the account's limit, e.g. 100 or 190",
            ));
        }
        rate.ten_second_max = n.value as u32;
    }
    if let Some(n) = &r.daily_max {
        if n.value == 0 {
            return Err(cx.err(n, "rate.daily_max: must be at least 1", "use the account's limit, e.g. 250000"));
        }
        rate.daily_max = n.value;
    }
    if let Some(p) = &r.park_probe {
        rate.park_probe = cx.duration("rate.park_probe", p)?;
    }
    Ok(rate)
}

/// Resolves one `auth` field, which must be present for the auth type.
fn auth_field(
    cx: &Ctx,
    auth: &RawAuth,
    key: &str,
    value: Option<&serde_saphyr::Spanned<String>>,
) -> Result<String, ConfigError> {
    match value {
        Some(v) => cx.resolve(&format!("auth.{key}"), v),
        None => Err(cx.err(
            &auth.kind,
            format!("auth type `{}` needs auth.{key}", auth.kind.value),
            format!("add `{key}:` under `auth:` (secrets as ${{env:NAME}} or ${{file:PATH}})"),
        )),
    }
}

fn auth(cx: &Ctx, name: &str, kind: &str, raw: &RawSink) -> Result<CrmAuth, ConfigError> {
    if let (Some(t), false) = (&raw.token, kind == "hubspot") {
        return Err(cx.err(
            t,
            format!("sink {name}: {kind} sinks sign in with `auth:`, not `token:`"),
            "use `auth: { type: jwt, ... }` or `auth: { type: client_credentials, ... }`",
        ));
    }
    let (Some(a), token) = (&raw.auth, &raw.token) else {
        if let Some(t) = &raw.token {
            return Ok(CrmAuth::Token(Secret::new(cx.resolve("token", t)?)));
        }
        let (needs, fix) = if kind == "hubspot" {
            (
                "`token:` or `auth:`",
                "add `token: ${env:HUBSPOT_TOKEN}` (a private-app token) \
                 or `auth: { type: oauth, client_id, client_secret, refresh_token }`",
            )
        } else {
            (
                "`auth:`",
                "add `auth: { type: jwt, client_id, username, private_key: ${file:/path/key.pem} }` \
                 or `auth: { type: client_credentials, client_id, client_secret }`",
            )
        };
        return Err(cx.err(&raw.name, format!("sink {name}: a {kind} sink needs {needs}"), fix));
    };
    if let Some(t) = token {
        return Err(cx.err(t, format!("sink {name}: both `token:` and `auth:` are set"), "keep one of them"));
    }
    let text = |key: &str, v: &Option<serde_saphyr::Spanned<String>>| auth_field(cx, a, key, v.as_ref());
    let extra = |key: &str, v: &Option<serde_saphyr::Spanned<String>>| match v {
        Some(v) => Err(cx.err(
            v,
            format!("auth.{key} does not apply to auth type `{}`", a.kind.value),
            format!("remove auth.{key}"),
        )),
        None => Ok(()),
    };
    match (kind, a.kind.value.trim()) {
        ("hubspot", "oauth") => {
            extra("username", &a.username)?;
            extra("private_key", &a.private_key)?;
            extra("audience", &a.audience)?;
            Ok(CrmAuth::RefreshToken {
                client_id: text("client_id", &a.client_id)?,
                client_secret: Secret::new(text("client_secret", &a.client_secret)?),
                refresh_token: Secret::new(text("refresh_token", &a.refresh_token)?),
            })
        }
        ("salesforce", "jwt") => {
            extra("client_secret", &a.client_secret)?;
            extra("refresh_token", &a.refresh_token)?;
            let private_key = Secret::new(text("private_key", &a.private_key)?);
            if let Err(why) = crate::connectors::oauth::rsa_key(&private_key) {
                let at = a.private_key.as_ref().expect("resolved above");
                let fix = "give the connected app certificate's private key, e.g. `${file:/etc/sluice/sf.key}` \
                           (PEM, BEGIN PRIVATE KEY or BEGIN RSA PRIVATE KEY)";
                return Err(cx.err(at, format!("auth.private_key: {why}"), fix));
            }
            let audience = match &a.audience {
                Some(v) => cx.resolve("auth.audience", v)?,
                None => "https://login.salesforce.com".to_string(),
            };
            Ok(CrmAuth::Jwt {
                client_id: text("client_id", &a.client_id)?,
                username: text("username", &a.username)?,
                private_key,
                audience,
            })
        }
        ("salesforce", "client_credentials") => {
            extra("username", &a.username)?;
            extra("private_key", &a.private_key)?;
            extra("refresh_token", &a.refresh_token)?;
            extra("audience", &a.audience)?;
            Ok(CrmAuth::ClientCredentials {
                client_id: text("client_id", &a.client_id)?,
                client_secret: Secret::new(text("client_secret", &a.client_secret)?),
            })
        }
        (_, other) => Err(cx.err(
            &a.kind,
            format!("sink {name}: auth type `{other}` is not one {kind} sinks take"),
            if kind == "hubspot" {
                "use `oauth` (or a private-app `token:` instead of `auth:`)"
            } else {
                "use `jwt` or `client_credentials`"
            },
        )),
    }
}

/// The key is what makes replays harmless: records are upserted by it, never created blindly.
fn key_required(cx: &Ctx, name: &str, raw: &RawSink, what: &str, example: &str) -> Result<(), ConfigError> {
    if raw.key.is_some() {
        return Ok(());
    }
    Err(cx.err(
        &raw.name,
        format!("sink {name}: this sink needs `key:` naming the {what} records are upserted by"),
        format!("add e.g. `key: {{ source: \"{{{{ after.id }}}}\", target: {example} }}` ({example} must be a {what})"),
    ))
}

pub(super) fn hubspot_sink(cx: &Ctx, raw: RawSink, sources: &[TableId]) -> Result<HubSpotSinkConfig, ConfigError> {
    let name = sink_name(cx, &raw)?;
    let kind = "hubspot";
    only_for(cx, &name, kind, "table", raw.table.as_ref())?;
    only_for(cx, &name, kind, "version", raw.version.as_ref())?;
    only_for(cx, &name, kind, "api_version", raw.api_version.as_ref())?;
    only_for(cx, &name, kind, "bulk_threshold", raw.bulk_threshold.as_ref())?;
    no_parquet_keys(cx, &name, kind, &raw)?;
    source_wins_only(cx, &name, kind, &raw)?;
    let url = api_url(cx, &name, &raw, "https://api.hubapi.com")?;
    let auth = auth(cx, &name, kind, &raw)?;
    let object = object(cx, &name, kind, &raw, "contacts")?;
    key_required(cx, &name, &raw, "unique property", "sluice_id")?;
    let mapping = mapping(cx, &name, &raw, sources)?;
    // Batches of many calls let calls overlap (keys are unique within a batch), so the budget is
    // used even when a call takes longer than the budget's spacing; only the last call of a batch
    // waits alone (5000 changes: 50 calls, about 1% lost at 150 ms a call).
    let batch = batch(cx, &raw, 5000)?;
    let defaults = AccountLimits { ten_second_max: 100, daily_max: 250_000, park_probe: Duration::from_secs(900) };
    let rate = limits(cx, &raw, defaults, kind)?;
    Ok(HubSpotSinkConfig { name, url, auth, object, mapping, batch, rate })
}

pub(super) fn salesforce_sink(
    cx: &Ctx,
    raw: RawSink,
    sources: &[TableId],
) -> Result<SalesforceSinkConfig, ConfigError> {
    let name = sink_name(cx, &raw)?;
    let kind = "salesforce";
    only_for(cx, &name, kind, "table", raw.table.as_ref())?;
    only_for(cx, &name, kind, "version", raw.version.as_ref())?;
    no_parquet_keys(cx, &name, kind, &raw)?;
    source_wins_only(cx, &name, kind, &raw)?;
    let url = api_url(cx, &name, &raw, "https://YOUR-DOMAIN.my.salesforce.com")?;
    let auth = auth(cx, &name, kind, &raw)?;
    let object = object(cx, &name, kind, &raw, "Contact")?;
    key_required(cx, &name, &raw, "external ID field", "Ext_Id__c")?;
    let api_version = match &raw.api_version {
        None => "62.0".to_string(),
        Some(v) => {
            let text = v.value.trim().trim_start_matches('v').to_string();
            if !text.parse::<f64>().is_ok_and(|n| n >= 46.0) {
                return Err(cx.err(
                    v,
                    format!("api_version `{}` is not a version from 46.0 on", v.value),
                    "write it like \"62.0\" (sObject Collections upsert needs 46.0 or later)",
                ));
            }
            text
        }
    };
    let bulk_threshold = match &raw.bulk_threshold {
        None => 2000,
        Some(n) if n.value == 0 => {
            return Err(cx.err(
                n,
                "bulk_threshold: must be at least 1",
                "Salesforce suggests Bulk API for more than 2000 records",
            ))
        }
        Some(n) => n.value as usize,
    };
    let mapping = mapping(cx, &name, &raw, sources)?;
    let batch = batch(cx, &raw, 10_000)?;
    let defaults = AccountLimits { ten_second_max: u32::MAX, daily_max: 100_000, park_probe: Duration::from_secs(900) };
    let rate = limits(cx, &raw, defaults, kind)?;
    Ok(SalesforceSinkConfig {
        name,
        url,
        auth,
        api_version,
        object,
        mapping,
        batch,
        bulk_threshold,
        park_probe: rate.park_probe,
    })
}
