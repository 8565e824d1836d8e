// A real tus 1.0 server for development and tests: the official reference
// implementation (@tus/server with @tus/file-store), so Dirigo's uploader is
// checked against the protocol as the tus project reads it, not against our
// own reading of it. Meant for loopback; it has no authentication.
//
//   node server.mjs --port 1080 --dir ./uploads [--host 127.0.0.1] [--path /files]
//                   [--max-size BYTES]
//
// Each upload is a data file named by its id in --dir, beside a JSON sidecar
// (<id>.json) holding id, size, metadata and creation date. The sidecar's
// offset stays at 0: the offset is the data file's length, so a server
// restarted on the same directory resumes where the last one stopped.
import http from 'node:http'
import fs from 'node:fs'
import {parseArgs} from 'node:util'
import {Server} from '@tus/server'
import {FileStore} from '@tus/file-store'

const usage =
  'usage: node server.mjs --port PORT --dir DIR [--host 127.0.0.1] [--path /files] [--max-size BYTES]'

function fail(message) {
  console.error(`tus server: ${message}\n${usage}`)
  process.exit(2)
}

let args
try {
  args = parseArgs({
    options: {
      host: {type: 'string', default: '127.0.0.1'},
      port: {type: 'string'},
      dir: {type: 'string'},
      path: {type: 'string', default: '/files'},
      'max-size': {type: 'string'},
    },
  }).values
} catch (error) {
  fail(error.message)
}

// A fixed port, never 0: the caller hands the URL to a client before it could
// read a kernel-chosen one, and a restart must come back on the same port.
const port = Number(args.port)
if (!Number.isInteger(port) || port < 1 || port > 65535) fail('--port must be 1..65535')
if (!args.dir) fail('--dir is required')
const maxSize = args['max-size'] === undefined ? 0 : Number(args['max-size'])
if (!Number.isSafeInteger(maxSize) || maxSize < 0) fail('--max-size must be a byte count')
// '/files', '/files/' and 'files' all mean the same route.
const route = `/${args.path.replace(/^\/+|\/+$/g, '')}`

// FileStore would create it too, but asynchronously and without reporting errors.
fs.mkdirSync(args.dir, {recursive: true})

const tus = new Server({
  path: route,
  maxSize,
  datastore: new FileStore({
    directory: args.dir,
    // Advertised as Upload-Expires so clients see the extension at work; long
    // enough that no test or development session ever meets it. Nothing here
    // deletes expired uploads: the store's clean-up judges completeness from
    // the sidecar, whose offset is never updated, so it would delete finished
    // uploads too.
    expirationPeriodInMilliseconds: 7 * 24 * 3600 * 1000,
  }),
  // Location is a path (tus 1.0 allows a relative one): clients resolve it against the
  // URL they created the upload with, so it stays right behind a TLS front or a proxy
  // that this server cannot see.
  generateUrl: (req, {path, id}) => `${path}/${id}`,
})

const server = http.createServer((req, res) => {
  // The request target may be origin-form (/files/ID) or absolute-form
  // (http://host:port/files/ID); the base only serves the former.
  const {pathname} = new URL(req.url ?? '/', 'http://base.invalid')
  if (pathname === '/healthz' && (req.method === 'GET' || req.method === 'HEAD')) {
    res.writeHead(200, {'Content-Type': 'text/plain', 'Content-Length': 3})
    res.end(req.method === 'GET' ? 'ok\n' : undefined)
    return
  }
  // @tus/server answers every path it is given; keep it on its own route.
  if (pathname !== route && pathname !== `${route}/` && !pathname.startsWith(`${route}/`)) {
    res.writeHead(404, {'Content-Type': 'text/plain', 'Content-Length': 10})
    res.end('Not found\n')
    return
  }
  tus.handle(req, res).catch((error) => {
    console.error('tus server: request failed:', error)
    if (!res.headersSent) res.writeHead(500)
    res.end()
  })
})

server.on('error', (error) => {
  console.error(`tus server: ${error.message}`)
  process.exit(1)
})

const shownHost = args.host.includes(':') ? `[${args.host}]` : args.host
server.listen(port, args.host, () => {
  console.log(`tus server listening on http://${shownHost}:${port}${route}/`)
})

// Stop accepting, drop idle keep-alive connections at once, and give requests
// in flight a moment to finish; their bytes already on disk are kept anyway.
function shutdown(signal) {
  console.error(`tus server: ${signal}, closing`)
  server.close(() => process.exit(0))
  server.closeIdleConnections()
  setTimeout(() => server.closeAllConnections(), 2000).unref()
}
process.once('SIGTERM', shutdown)
process.once('SIGINT', shutdown)
