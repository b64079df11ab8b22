-- Argo CD health check for inference.tandem.dev/AcceleratorPool (Lua 5.1, as Argo CD runs it).
-- A pool is healthy when the operator found matching nodes with devices (Ready=True); it is
-- degraded when it found none (Ready=False: NoMatchingNodes, NoDevices), so services on it cannot run.
local hs = {}
local ready = nil
if obj.status ~= nil and obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Ready" then
      ready = c
    end
  end
end

local generation = obj.metadata.generation
local observed = nil
if obj.status ~= nil then
  observed = obj.status.observedGeneration
end
if ready == nil or (generation ~= nil and observed ~= nil and observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Tandem operator to count the pool's nodes"
  return hs
end

if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = string.format("%d nodes, %d devices (%d allocated)",
    obj.status.matchingNodes or 0, obj.status.allocatableDevices or 0, obj.status.allocatedDevices or 0)
  return hs
end
hs.status = "Degraded"
hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
return hs
