"""Pure Phoenix / Supabase Realtime protocol: no asyncio, no sockets, no drivers."""
