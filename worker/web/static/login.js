// Keeps a shared dashboard link's view (#/jobs/<id>, #/clients/<id>, filters) across sign-in: the
// form posts to a URL carrying the fragment, and the browser keeps it through the 303 redirect.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const form = document.querySelector("form[action='/dashboard/login']");
  if (form && location.hash) form.action = `/dashboard/login${location.hash}`;
});
