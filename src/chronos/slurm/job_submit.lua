--[[ Chronos job_submit.lua: sane GPU shard requests at submission (docs/SLURM.md).

Enable it with JobSubmitPlugins=lua in slurm.conf and this file, named
job_submit.lua, next to slurm.conf (find it with `chronos slurm lua-path`).
It only looks at jobs that ask for shards (--gres=shard:N); every other job
passes untouched. It rejects, with a message sbatch/srun/salloc show:
  * a shard request larger than one GPU (Slurm 22.05 puts a job's shards on one
    GPU per node, so such a job would otherwise stay PENDING forever);
  * shards without a time limit (Chronos fences a job's share until its end);
  * more shards per node than the site allows in a partition or QOS.
Edit the settings below; one shard is [slurm] shard_bytes of GPU memory (1 GiB).
--]]

-- ---------------------------------------------------------------- site settings
-- The largest shard Count of one GPU in gres.conf (80 for 80 GiB GPUs at 1 GiB a shard).
SHARDS_PER_GPU = 80
-- Require --time with --gres=shard (a partition's DefaultTime is not visible here).
REQUIRE_TIME_LIMIT = true
-- Most shards per node a job may ask for, by partition and by QOS (absent: no cap).
PARTITION_CAPS = {}
QOS_CAPS = {}
-- -----------------------------------------------------------------------------

-- Shards per node in a TRES string: "gres:shard:150", "gres/shard:g0:4", "gres:gpu:1,gres:shard:2".
local function shards_in(spec)
   if spec == nil then
      return 0
   end
   local total = 0
   for item in string.gmatch(spec, "[^,]+") do
      if string.find(item, "shard", 1, true) then
         local count = string.match(item, ":(%d+)$")
         total = total + (tonumber(count) or 1)
      end
   end
   return total
end

local function reject(message)
   slurm.log_user("chronos: " .. message)
   return slurm.ERROR
end

-- The partition a job goes to: the one it names (first of a list), else the default.
local function partition_of(job_desc, part_list)
   if job_desc.partition ~= nil then
      return string.match(job_desc.partition, "[^,]+")
   end
   for _, part in pairs(part_list or {}) do
      if part.flag_default == 1 then
         return part.name
      end
   end
   return nil
end

local function check(job_desc, part_list, require_time)
   local shards = math.max(shards_in(job_desc.tres_per_node), shards_in(job_desc.tres_per_task))
   if shards == 0 then
      return slurm.SUCCESS
   end
   if shards > SHARDS_PER_GPU then
      return reject(string.format(
         "%d shards do not fit on one GPU (at most %d per GPU per node); ask for fewer, " ..
         "or for more nodes", shards, SHARDS_PER_GPU))
   end
   if require_time and REQUIRE_TIME_LIMIT and
      (job_desc.time_limit == nil or job_desc.time_limit == slurm.NO_VAL) then
      return reject("a job with --gres=shard needs a time limit: add --time (e.g. --time=60)")
   end
   local partition = partition_of(job_desc, part_list)
   if partition ~= nil and PARTITION_CAPS[partition] ~= nil and shards > PARTITION_CAPS[partition] then
      return reject(string.format("partition %s allows at most %d shards per node (asked: %d)",
         partition, PARTITION_CAPS[partition], shards))
   end
   local qos = job_desc.qos
   if qos ~= nil and QOS_CAPS[qos] ~= nil and shards > QOS_CAPS[qos] then
      return reject(string.format("QOS %s allows at most %d shards per node (asked: %d)",
         qos, QOS_CAPS[qos], shards))
   end
   return slurm.SUCCESS
end

function slurm_job_submit(job_desc, part_list, submit_uid)
   return check(job_desc, part_list, true)
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
   return check(job_desc, part_list, false)  -- a change of shards; the time limit was checked at submit
end

return slurm.SUCCESS
