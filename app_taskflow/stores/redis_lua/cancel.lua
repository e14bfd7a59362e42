-- Cancel a PENDING task, or request the cancel of a RUNNING one. ARGV: prefix, task id, now.
-- Reply: {'missing'}, {'finished', task} when it already ended, or {'cancelled', task}.

local id, now = ARGV[2], ARGV[3]
local old = read_state(id)
if old == nil then return {'missing'} end
if TERMINAL[old.status] then return {'finished', record_reply(id, true)} end

if old.status == 'PENDING' then
  change_task(old, {status = 'CANCELLED', finished_at = now, scheduled_at = false, owner = false})
else
  change_task(old, {cancel_requested = '1'})
end
return {'cancelled', record_reply(id, true)}
