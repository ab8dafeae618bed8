// openid-client (npm), used as its README shows for a CLI: OpenID Connect discovery of the issuer
// (/.well-known/openid-configuration, the library's default), dynamic registration of a public client for the
// device grant, the device flow, a call to the protected MCP resource, refresh, revocation. Driven by
// tests/e2e/test_oauth_clients.py: one JSON line on stdout per step; the test approves the device code in the
// browser when it reads the "device" line. Plain http is allowed because the test server is on loopback.
//
// Run: node openid_device.mjs ISSUER RESOURCE_URL
import * as client from "openid-client";

const [issuer, resource] = process.argv.slice(2);
const emit = (event, data = {}) => process.stdout.write(JSON.stringify({ event, ...data }) + "\n");
const DEVICE = "urn:ietf:params:oauth:grant-type:device_code";
// allowInsecureRequests: plain http on loopback; enableNonRepudiationChecks: ID token signatures are verified
// against the issuer's jwks_uri (by default the library trusts the TLS channel for token endpoint answers)
const insecure = { execute: [client.allowInsecureRequests, client.enableNonRepudiationChecks] };

async function mcp(config, accessToken, message, session) {
  // One MCP JSON-RPC message over Streamable HTTP, the bearer token put on by openid-client.
  const headers = new Headers({ "content-type": "application/json", accept: "application/json, text/event-stream" });
  if (session) headers.set("mcp-session-id", session);
  const response = await client.fetchProtectedResource(
    config, accessToken, new URL(resource), "POST", JSON.stringify(message), headers,
  );
  const text = await response.text();
  const data = text.split("\n").filter((l) => l.startsWith("data:")).map((l) => JSON.parse(l.slice(5)));
  return {
    status: response.status,
    session: response.headers.get("mcp-session-id"),
    challenge: response.headers.get("www-authenticate"),
    body: data.length ? data[data.length - 1] : text ? safeJson(text) : null,
  };
}

function safeJson(text) {
  try { return JSON.parse(text); } catch { return text.slice(0, 300); }
}

async function whoami(config, accessToken) {
  const init = await mcp(config, accessToken, {
    jsonrpc: "2.0", id: 1, method: "initialize",
    params: { protocolVersion: "2025-06-18", capabilities: {}, clientInfo: { name: "openid-client e2e", version: "1" } },
  });
  if (init.status !== 200) return init;
  await mcp(config, accessToken, { jsonrpc: "2.0", method: "notifications/initialized" }, init.session);
  const call = { jsonrpc: "2.0", id: 2, method: "tools/call", params: { name: "whoami", arguments: {} } };
  return mcp(config, accessToken, call, init.session);
}

async function failure(promise) {
  try {
    await promise;
    return null;
  } catch (err) {
    const challenges = Array.isArray(err.cause) ? err.cause : undefined; // WWWAuthenticateChallengeError
    return { name: err.name, code: err.code, error: err.error, status: err.status ?? err.response?.status, challenges };
  }
}

async function main() {
  // Discovery (OIDC: issuer + /.well-known/openid-configuration) and registration in one call.
  const config = await client.dynamicClientRegistration(
    new URL(issuer),
    {
      client_name: "openid-client e2e",
      grant_types: [DEVICE, "refresh_token"],
      redirect_uris: [],
      token_endpoint_auth_method: "none",
      scope: "openid offline_access",
    },
    client.None(),
    insecure,
  );
  const server = config.serverMetadata();
  emit("registered", {
    client_id: config.clientMetadata().client_id,
    has_secret: Boolean(config.clientMetadata().client_secret),
    registered_scope: config.clientMetadata().scope ?? null,
    issuer: server.issuer,
    device_endpoint: server.device_authorization_endpoint,
  });

  const device = await client.initiateDeviceAuthorization(config, { scope: "openid offline_access", resource });
  emit("device", {
    user_code: device.user_code,
    verification_uri: device.verification_uri,
    verification_uri_complete: device.verification_uri_complete,
    interval: device.interval,
  });
  const tokens = await client.pollDeviceAuthorizationGrant(config, device, { resource });
  emit("tokens", {
    access_token: tokens.access_token,
    refresh_token: tokens.refresh_token,
    expires_in: tokens.expiresIn(),
    scope: tokens.scope,
    token_type: tokens.token_type,
    id_token_claims: tokens.claims() ?? null, // checked by the library: iss, aud, exp, iat, signature
  });
  emit("call", await whoami(config, tokens.access_token));

  const fresh = await client.refreshTokenGrant(config, tokens.refresh_token, { resource });
  emit("refreshed", {
    access_token: fresh.access_token,
    refresh_token: fresh.refresh_token,
    id_token_claims: fresh.claims() ?? null,
  });
  emit("call", await whoami(config, fresh.access_token));

  await client.tokenRevocation(config, fresh.refresh_token, { token_type_hint: "refresh_token" });
  emit("revoked");
  emit("call_after_revocation", { failure: await failure(whoami(config, fresh.access_token)) });
  emit("refresh_after_revocation", { failure: await failure(client.refreshTokenGrant(config, fresh.refresh_token)) });
  emit("done");
}

main().catch((err) => {
  emit("error", { name: err?.name, code: err?.code, error: err?.error, message: String(err?.message ?? err) });
  process.exit(1);
});
