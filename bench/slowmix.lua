-- bench/slowmix.lua -- wrk script for the slow-mix scenario: every 10th
-- request of each wrk thread asks for /slow (the server blocks
-- 5 ms before answering it), the others for /.  Headers given with -H (for
-- example "Connection: close") are kept: wrk.format uses wrk.headers.
local n = 0
request = function()
   n = n + 1
   if n % 10 == 0 then
      return wrk.format("GET", "/slow")
   end
   return wrk.format("GET", "/")
end
