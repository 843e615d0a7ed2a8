{{- define "emporium.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: emporium
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "emporium.gatewayName" -}}
{{- printf "%s-gateway" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "emporium.svcHost" -}}
{{- printf "%s.%s.svc.cluster.local" .name .ctx.Release.Namespace -}}
{{- end -}}

{{- define "emporium.jwksUri" -}}
{{- .Values.auth.jwks.uri | default .Values.global.jwt.jwksUrl | default (printf "http://users.%s.svc.cluster.local:8000/.well-known/jwks.json" .Release.Namespace) -}}
{{- end -}}

{{/* The CORS policy of an API route (nothing when no origin is allowed). */}}
{{- define "emporium.retries" -}}
{{- with .Values.ingress.retries }}
retries:
  attempts: {{ .attempts }}
  retryOn: {{ .retryOn | quote }}
{{- end }}
{{- end -}}

{{- define "emporium.cors" -}}
{{- with .Values.ingress.cors }}
{{- if .allowOrigins }}
corsPolicy:
  allowOrigins:
    {{- range .allowOrigins }}
    - exact: {{ . | quote }}
    {{- end }}
  allowMethods: {{ toJson .allowMethods }}
  allowHeaders: {{ toJson .allowHeaders }}
  exposeHeaders: {{ toJson .exposeHeaders }}
  maxAge: {{ .maxAge | quote }}
  allowCredentials: {{ .allowCredentials }}
{{- end }}
{{- end }}
{{- end -}}
