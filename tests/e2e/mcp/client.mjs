// An MCP client built on the official TypeScript SDK (@modelcontextprotocol/sdk), driven by
// tests/e2e/test_mcp_sdk.py through a line protocol (one JSON object per line):
//
//   node client.mjs <mcp server URL> <redirect URI>
//   stdout  {"event": "authorize", "url": "..."}   the SDK wants the user's browser at this URL
//           {"event": "connected"}                 initialize succeeded (after the browser step, if any)
//           {"event": "result", "data": {...}}     a whoami result (its structured content)
//           {"event": "error", "name": "...", "message": "..."}
//           {"event": "tokens", "access_prefix": "sca", "has_refresh": true}   every time the SDK saves tokens
//   stdin   {"code": "...", "state": "...", "iss": "..."}   the redirect's parameters, after "authorize"
//           {"cmd": "whoami"} | {"cmd": "quit"}
//
// Everything OAuth (discovery, registration, PKCE, token exchange, refresh, reaction to revocation) is the
// SDK's own; this file only keeps state in memory and carries the browser step across the pipe. It checks
// the redirect's state and RFC 9207 iss itself, because the SDK leaves that to the application.
import readline from 'node:readline';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { UnauthorizedError } from '@modelcontextprotocol/sdk/client/auth.js';

const [serverUrl, redirectUrl] = process.argv.slice(2);
if (!serverUrl || !redirectUrl) {
    console.error('usage: node client.mjs <mcp server URL> <redirect URI>');
    process.exit(2);
}

function emit(obj) {
    process.stdout.write(JSON.stringify(obj) + '\n');
}

const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function nextMessage() {
    const { value, done } = await lines.next();
    if (done) {
        throw new Error('stdin closed');
    }
    return JSON.parse(value);
}

class ScriptedProvider {
    constructor() {
        this._client = undefined;
        this._tokens = undefined;
        this._verifier = undefined;
        this._discovery = undefined;
        this.lastState = undefined;
    }
    get redirectUrl() {
        return redirectUrl;
    }
    get clientMetadata() {
        return {
            client_name: 'sidecar e2e (TypeScript SDK)',
            redirect_uris: [redirectUrl],
            grant_types: ['authorization_code', 'refresh_token'],
            response_types: ['code'],
            token_endpoint_auth_method: 'none'
        };
    }
    state() {
        this.lastState = crypto.randomUUID();
        return this.lastState;
    }
    clientInformation() {
        return this._client;
    }
    saveClientInformation(info) {
        this._client = info;
    }
    tokens() {
        return this._tokens;
    }
    saveTokens(tokens) {
        this._tokens = tokens;
        emit({
            event: 'tokens',
            access_prefix: String(tokens.access_token).split('.')[0],
            has_refresh: Boolean(tokens.refresh_token)
        });
    }
    redirectToAuthorization(url) {
        emit({ event: 'authorize', url: url.toString() });
    }
    saveCodeVerifier(verifier) {
        this._verifier = verifier;
    }
    codeVerifier() {
        return this._verifier;
    }
    saveDiscoveryState(state) {
        this._discovery = state;
    }
    discoveryState() {
        return this._discovery;
    }
    invalidateCredentials(scope) {
        if (scope === 'all' || scope === 'client') this._client = undefined;
        if (scope === 'all' || scope === 'tokens') this._tokens = undefined;
        if (scope === 'all' || scope === 'verifier') this._verifier = undefined;
        if (scope === 'all' || scope === 'discovery') this._discovery = undefined;
    }
}

const provider = new ScriptedProvider();
let client;

async function connectOnce() {
    const transport = new StreamableHTTPClientTransport(new URL(serverUrl), { authProvider: provider });
    const c = new Client({ name: 'sidecar-e2e-ts', version: '1.0.0' });
    await c.connect(transport);
    return { c, transport };
}

async function connect() {
    const transport = new StreamableHTTPClientTransport(new URL(serverUrl), { authProvider: provider });
    const c = new Client({ name: 'sidecar-e2e-ts', version: '1.0.0' });
    try {
        await c.connect(transport);
        return c;
    } catch (error) {
        if (!(error instanceof UnauthorizedError)) throw error;
    }
    // The SDK has printed the authorization URL; the test drives the browser and sends the redirect back.
    const answer = await nextMessage();
    if (answer.state !== provider.lastState) {
        throw new Error('state mismatch in the authorization response');
    }
    const issuer = provider.discoveryState()?.authorizationServerMetadata?.issuer;
    if (answer.iss !== issuer) {
        throw new Error(`iss ${answer.iss} is not the authorization server's issuer ${issuer}`);
    }
    await transport.finishAuth(answer.code);
    return (await connectOnce()).c;
}

async function whoami() {
    const result = await client.callTool({ name: 'whoami', arguments: {} });
    if (result.isError) throw new Error('tool error: ' + JSON.stringify(result.content));
    const data = result.structuredContent ?? JSON.parse(result.content[0].text);
    return data.result ?? data;
}

async function main() {
    try {
        client = await connect();
        emit({ event: 'connected' });
    } catch (error) {
        emit({ event: 'error', name: error?.constructor?.name, message: String(error?.message ?? error) });
        process.exit(1);
    }
    for (;;) {
        let msg;
        try {
            msg = await nextMessage();
        } catch {
            break;
        }
        if (msg.cmd === 'quit') break;
        if (msg.cmd !== 'whoami') {
            emit({ event: 'error', name: 'Protocol', message: 'unknown command' });
            continue;
        }
        try {
            emit({ event: 'result', data: await whoami() });
        } catch (error) {
            emit({ event: 'error', name: error?.constructor?.name, message: String(error?.message ?? error) });
        }
    }
    await client.close().catch(() => {});
    process.exit(0);
}

main();
