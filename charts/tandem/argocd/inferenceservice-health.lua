-- Argo CD health check for inference.tandem.dev/InferenceService (Lua 5.1, as Argo CD runs it).
-- Reads the conditions the operator writes (Ready, Progressing, Degraded) and only trusts them
-- once the operator has observed the object's current generation.
local hs = {}
local function find(conditions, type_)
  for _, c in ipairs(conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

if obj.status == nil or obj.status.conditions == nil or #obj.status.conditions == 0 then
  hs.status = "Progressing"
  hs.message = "Waiting for the Tandem operator to reconcile"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Tandem operator to observe generation " .. tostring(generation)
  return hs
end

local conditions = obj.status.conditions
local ready = find(conditions, "Ready")
local degraded = find(conditions, "Degraded")
local progressing = find(conditions, "Progressing")

if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = (degraded.reason or "Degraded") .. ": " .. (degraded.message or "")
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  if obj.status.ratio ~= nil then
    hs.message = hs.message .. " P:D " .. obj.status.ratio
  end
  return hs
end
hs.status = "Progressing"
if progressing ~= nil and progressing.status == "True" and progressing.message ~= nil then
  hs.message = progressing.message
elseif ready ~= nil then
  hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
else
  hs.message = "Waiting for the Ready condition"
end
return hs
