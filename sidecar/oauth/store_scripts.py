"""The Lua scripts of the Redis grant store, each commented with its KEYS and ARGV.

Apart from ``store_redis.py`` so the Python there reads as the store's steps; every multi-key change of
a grant is one of these scripts, so it is atomic even on Redis Cluster.
"""

# Every script touches only keys of one grant (one {grant_id} slot) or one single key. Keys built inside
# a script (the grant's token records) share the declared keys' hash tag, so Cluster routes them with them.
#
# Ends a grant. KEYS g, k; ARGV key prefix, "{gid}". Returns the grant JSON or nil.
END_BODY = """
local function end_grant(g, k, pre, tag)
  local d = redis.call('HGET', g, 'd')
  if not d then return nil end
  local rt = redis.call('HGET', g, 'rt')
  if rt then redis.call('DEL', pre .. 'rt:' .. tag .. ':' .. rt) end
  local ru = redis.call('HGET', g, 'ru')
  if ru then redis.call('DEL', pre .. 'ru:' .. tag .. ':' .. ru) end
  for _, m in ipairs(redis.call('ZRANGE', k, 0, -1)) do redis.call('DEL', pre .. m) end
  redis.call('DEL', g, k)
  return d
end
"""
END = END_BODY + "return end_grant(KEYS[1], KEYS[2], ARGV[1], ARGV[2])"
# The same, only for a grant that never issued tokens (an abandoned code or device approval).
END_UNREDEEMED = (
    END_BODY
    + """
if redis.call('HEXISTS', KEYS[1], 'rt') == 1 then return nil end
return end_grant(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
"""
)
# Issue or rotate. KEYS g, k, access key, new refresh key, used refresh key (or the new one again), reuse
# key of the used one (or of the new one); ARGV access record, access ttl ms, refresh record, refresh ttl ms,
# used hash or "", now, client ip, user agent, grant ttl ms, prefix, "{gid}", access member, access expiry,
# new refresh hash, kept, chars, sealed answer, reuse window ms ("0": none). A rotation keeps its sealed
# answer for the window under the used hash (field ru names it) and drops the previous rotation's: only
# the latest rotation can be retried. Returns {'again'} for a retry of it within the window.
ISSUE = (
    END_BODY
    + """
if redis.call('HEXISTS', KEYS[1], 'd') == 0 then return {'unknown'} end
local used = ARGV[5]
local cur = redis.call('HGET', KEYS[1], 'rt')
if used == '' then
  if cur then return {'unknown'} end
elseif cur ~= used then
  if ARGV[18] ~= '0' and redis.call('EXISTS', KEYS[6]) == 1 then return {'again'} end
  local old = redis.call('HGET', KEYS[1], 'used') or ''
  if string.find(' ' .. old .. ' ', ' ' .. string.sub(used, 1, tonumber(ARGV[16])) .. ' ', 1, true) then
    return {'replayed', end_grant(KEYS[1], KEYS[2], ARGV[10], ARGV[11])}
  end
  return {'unknown'}
else
  redis.call('DEL', KEYS[5])
  local old = redis.call('HGET', KEYS[1], 'used') or ''
  local list = string.sub(used, 1, tonumber(ARGV[16]))
  local n = 1
  for h in string.gmatch(old, '%S+') do
    if n >= tonumber(ARGV[15]) then break end
    list = list .. ' ' .. h
    n = n + 1
  end
  redis.call('HSET', KEYS[1], 'used', list)
  local ru = redis.call('HGET', KEYS[1], 'ru')
  if ru then redis.call('DEL', ARGV[10] .. 'ru:' .. ARGV[11] .. ':' .. ru) end
  if ARGV[18] ~= '0' then
    redis.call('SET', KEYS[6], ARGV[17], 'PX', ARGV[18])
    redis.call('HSET', KEYS[1], 'ru', used)
  else
    redis.call('HDEL', KEYS[1], 'ru')
  end
end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[4], ARGV[3], 'PX', ARGV[4])
redis.call('HSET', KEYS[1], 'rt', ARGV[14], 'lu', ARGV[6], 'lf', ARGV[7], 'ua', ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[13], ARGV[12])
redis.call('PEXPIRE', KEYS[1], ARGV[9])
redis.call('PEXPIRE', KEYS[2], ARGV[9])
return {'ok'}
"""
)
# A grant's token or code record, registered for revocation. KEYS g, k, record; ARGV value, ttl ms, member,
# expiry. Nothing when the grant is gone.
PUT_MEMBER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return 1
"""
# KEYS code. Returns {first_use, json} or nil; marks it used (keeps its TTL).
TAKE_CODE = """
local v = redis.call('GET', KEYS[1])
if not v then return nil end
if string.sub(v, 1, 1) == '1' then return {0, string.sub(v, 2)} end
redis.call('SET', KEYS[1], '1' .. string.sub(v, 2), 'KEEPTTL')
return {1, string.sub(v, 2)}
"""
# KEYS g, k; ARGV prefix, "{gid}", used hash (cut). Ends the grant when the hash is one it rotated away.
REPLAY = (
    END_BODY
    + """
local old = redis.call('HGET', KEYS[1], 'used') or ''
if string.find(' ' .. old .. ' ', ' ' .. ARGV[3] .. ' ', 1, true) then
  return end_grant(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
end
return nil
"""
)
# KEYS g; ARGV now, client ip.
TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'lu', ARGV[1], 'lf', ARGV[2])
return 1
"""
# KEYS user index; ARGV score, member, ttl ms. Adds (or moves) a grant; the index outlives its grants.
INDEX = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""
# KEYS device; ARGV new JSON, expected status.
DEVICE_CAS = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local cur = cjson.decode(v)
if cur['status'] ~= ARGV[2] then return 0 end
local new = cjson.decode(ARGV[1])
new['last_poll_at'] = cur['last_poll_at']
new['interval'] = cur['interval']
redis.call('SET', KEYS[1], cjson.encode(new), 'KEEPTTL')
return 1
"""
# KEYS device; ARGV now, step. Returns {json after, too_fast}.
DEVICE_POLL = """
local v = redis.call('GET', KEYS[1])
if not v then return nil end
local cur = cjson.decode(v)
local now = tonumber(ARGV[1])
local prev = tonumber(cur['last_poll_at']) or 0
local fast = 0
if prev > 0 and now - prev < tonumber(cur['interval']) then
  fast = 1
  cur['interval'] = tonumber(cur['interval']) + tonumber(ARGV[2])
end
cur['last_poll_at'] = now
local out = cjson.encode(cur)
redis.call('SET', KEYS[1], out, 'KEEPTTL')
return {out, fast}
"""
TAKE = """
local v = redis.call('GET', KEYS[1])
if v then redis.call('DEL', KEYS[1]) end
return v
"""


# Unused clients (anonymous registrations no user has granted yet): their record starts with UNUSED and
# lives the short TTL. Their pool is counted across replicas in keys sharing the {cn} hash tag (one slot):
#   {cn}    zset  client id by expiry        {cn}:w  hash  client id -> network
#   {cn}:h  zset  network by unused count    {cn}:n:<network>  zset  that network's client ids by expiry
UNUSED = b"u:"
# Forget one client of the pool. KEYS {cn}, {cn}:w, {cn}:h; ``per`` the "{cn}:n:" key prefix.
POOL_BODY = """
local function forget(id, per)
  local net = redis.call('HGET', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  if net then
    redis.call('ZREM', per .. net, id)
    if tonumber(redis.call('ZINCRBY', KEYS[3], -1, net)) <= 0 then redis.call('ZREM', KEYS[3], net) end
  end
end
"""
# Admit a new unused client (unused_pool.py has the rule). KEYS {cn}, {cn}:w, {cn}:h; ARGV now, max, share,
# client id, expiry, ttl ms, network, "{cn}:n:" key prefix. Returns the id of the client forgotten, or "".
POOL_ADMIT = (
    POOL_BODY
    + """
local per, net = ARGV[8], ARGV[7]
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1000)) do forget(id, per) end
local own = redis.call('ZCARD', per .. net)
local from = nil
if own >= tonumber(ARGV[3]) then
  from = net
elseif redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local top = redis.call('ZREVRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  if top[1] and tonumber(top[2]) > own then from = top[1] else from = net end
end
local evicted = ''
if from then
  local oldest = redis.call('ZRANGE', per .. from, 0, 0)[1]
  if oldest then
    forget(oldest, per)
    evicted = oldest
  end
end
redis.call('ZADD', KEYS[1], ARGV[5], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[4], net)
redis.call('ZADD', per .. net, ARGV[5], ARGV[4])
redis.call('ZINCRBY', KEYS[3], 1, net)
for _, k in ipairs({KEYS[1], KEYS[2], KEYS[3], per .. net}) do redis.call('PEXPIRE', k, ARGV[6]) end
return evicted
"""
)
# A client left the pool (a user granted it access). KEYS as POOL_ADMIT; ARGV client id, "{cn}:n:" prefix.
POOL_LEAVE = POOL_BODY + "forget(ARGV[1], ARGV[2])\nreturn 1"
# KEYS client. Delete a client forgotten by the pool, unless a user granted it access meanwhile.
DROP_UNUSED = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 2) == 'u:' then return redis.call('DEL', KEYS[1]) end
return 0
"""
# A bounded set of live members (a client's device authorizations). KEYS the zset (member by
# expiry); ARGV now, max, member, expiry, ttl ms. 1 when the member was added, 0 when the set is full.
COUNT_NEW = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[5]) then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
return 1
"""
# KEYS client; ARGV ttl ms. An unused client becomes used (1); a used one stays (2); none: 0.
PROMOTE = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
if string.sub(v, 1, 2) ~= 'u:' then return 2 end
redis.call('SET', KEYS[1], string.sub(v, 3), 'PX', ARGV[1])
return 1
"""
# KEYS client; ARGV ttl ms. Renews a used client only.
TOUCH_CLIENT = """
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 2) == 'u:' then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[1])
"""
